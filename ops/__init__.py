"""`python -m ops`: queue status and steering; `ops.status`/`ops.control` return the dicts `--json` prints,
`ops.render` draws them with rich."""
