"""Pure rules and data, no I/O: fal's schemas, model variants, error bodies, extensions, API keys,
signatures."""
