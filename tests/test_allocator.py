"""Workers keep freed memory (BIREFNET_RETAIN_FREED_MEMORY): once warm, a forward pass reuses the
activation buffers of the previous one instead of page-faulting fresh memory in."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A nano predictor at 1024x1024 (its largest activations are 32 MiB and more, past glibc's
# mmap threshold); prints the minor page faults of each of three predictions.
PROBE = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, {repo!r})
    from PIL import Image
    from common.settings import Settings
    from common.variants import VariantSpec
    from worker.engine import Predictor
    settings = Settings(device="cpu", retain_freed_memory={retain}, warmup_forward=False, torch_threads=1)
    predictor = Predictor(VariantSpec(id="nano", weights="recipe", backbone="swin_v1_nano"), settings)
    predictor.load()
    photo = Image.new("RGB", (1024, 1024), (120, 30, 200))
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        predictor.predict_masks([photo], (1024, 1024))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps(faults))
    """
)


def _faults_per_forward(retain: bool) -> list[int]:
    code = PROBE.format(repo=str(REPO), retain=retain)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_warm_worker_forward_does_not_page_fault():
    # glibc as it ships unmaps big blocks on free: every forward faults its activations in again
    # (~38k faults, 150 MB, here).
    assert _faults_per_forward(retain=False)[-1] > 10_000
    # The worker default: after the first forwards the heap holds what a forward needs.
    assert _faults_per_forward(retain=True)[-1] < 1_000
