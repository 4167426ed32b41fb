"""Writes the compose stack's credentials into .env (beside docker-compose.yml; git-ignored), random and
new on first use: docker-compose.yml refuses to start without them. Values already in the file are kept,
so running it again changes nothing; delete a line to regenerate that value.

    python3 infra/compose/init_secrets.py [path/to/.env]
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

# name -> generator. Hex only: the values go into URLs (the Redis URL) and YAML unquoted.
GENERATED = {
    "REDIS_PASSWORD": lambda: secrets.token_hex(24),
    "S3_ACCESS_KEY": lambda: "birefnet" + secrets.token_hex(6),
    "S3_SECRET_KEY": lambda: secrets.token_hex(24),
    # Bearer token between the S3 store's webhook target and `producer http`.
    "EVENTS_TOKEN": lambda: secrets.token_hex(24),
    # HMAC secret of gateway-served URLs and upload tokens.
    "GATEWAY_SIGNING_SECRET": lambda: secrets.token_hex(32),
    # Ed25519 seed (32 bytes, hex) signing webhooks; published as a JWKS by the gateway.
    "WEBHOOK_SIGNING_KEY": lambda: secrets.token_hex(32),
}


def read_env(path: Path) -> dict[str, str]:
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            name, sep, value = line.partition("=")
            if sep and not name.lstrip().startswith("#"):
                values[name.strip()] = value.strip()
    return values


def main(argv: list[str]) -> int:
    path = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2] / ".env"
    existing = read_env(path)
    added = {name: make() for name, make in GENERATED.items() if not existing.get(name)}
    if added:
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        text += "".join(f"{name}={value}\n" for name, value in added.items())
        # Created private: only the owner may read the credentials.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o600)
    print(
        f"{path}: {len(added)} credential(s) generated ({', '.join(added) or 'none'}), "
        f"{len(GENERATED) - len(added)} kept"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
