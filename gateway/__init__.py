"""The fal-compatible HTTP gateway for fal-ai/birefnet and fal-ai/birefnet/v2 (docs/api.md)."""
