"""Running the official Python fal-client against a gateway stack, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.helpers.gateway import ALICE, GatewayStack
from tests.helpers.images import data_uri, png_bytes
from tests.helpers.stack import ROOT

APP = "fal-ai/birefnet/v2"
IMAGE = data_uri(png_bytes((72, 40)))
NOT_AN_IMAGE = data_uri(b"<html>not an image</html>", "text/html")

PRELUDE = f"""
import json, os, sys, time
import fal_client
from fal_client import Completed, InProgress, Queued, FalClientHTTPError
APP = {APP!r}
IMAGE = {IMAGE!r}
NOT_AN_IMAGE = {NOT_AN_IMAGE!r}
def out(value):
    print("RESULT " + json.dumps(value))
"""


def run_client(gs: GatewayStack, body: str, timeout: float = 180) -> dict:
    """Run a fal_client script in a subprocess; returns what it passed to out()."""
    host = f"127.0.0.1:{gs.gateway.port}"
    env = {
        **os.environ,
        "FAL_KEY": ALICE,
        "FAL_RUN_HOST": f"{host}/run",
        "FAL_QUEUE_RUN_HOST": f"{host}/queue",
        "SSL_CERT_FILE": str(gs.gateway.tls.ca),
        "PYTHONPATH": str(ROOT),
    }
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"client failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(lines[-1][len("RESULT ") :])
