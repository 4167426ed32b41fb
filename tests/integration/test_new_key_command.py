"""`python -m ops new-key` prints a FAL_KEY and the BIREFNET_GATEWAY_API_KEYS entry that accepts it, without
reaching Redis."""

import json
import os
import subprocess
import sys
from pathlib import Path

from common.domain.auth import ApiKeyConfig, KeyRing

ROOT = Path(__file__).resolve().parents[2]


def test_new_key_prints_a_key_its_entry_accepts():
    env = {**os.environ, "BIREFNET_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "ops", "new-key", "--id", "team-a", "--user-id", "u1", "--admin"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    key_line, entry_line = out.strip().splitlines()
    assert key_line.startswith("FAL_KEY=team-a:")
    entry = json.loads(entry_line)
    assert entry["id"] == "team-a" and entry["user_id"] == "u1" and entry["admin"] is True
    assert entry["hash"].startswith("scrypt$")
    ring = KeyRing([ApiKeyConfig(**entry)])
    principal = ring.authenticate(key_line.removeprefix("FAL_KEY="))
    assert principal is not None and principal.admin
    assert ring.authenticate("team-a:wrong") is None
