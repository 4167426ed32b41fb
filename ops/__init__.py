"""`python -m ops`: see where the queues stand and steer them (status, pause/resume/drain, dead letters).

Data gathering (`ops.status`, `ops.control`) returns plain dicts (what `--json` prints); `ops.render`
draws them with rich.
"""
