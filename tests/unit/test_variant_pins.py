"""Every Hugging Face checkpoint source is pinned to a commit (a 40-hex revision): a re-upload to the model
repo cannot change what a variant serves."""

from __future__ import annotations

import re

from common.domain.variants import BUILTIN_VARIANTS

HF_SOURCE = re.compile(r"^hf://(?P<repo>[\w.-]+/[\w.-]+)@(?P<revision>[^/]+)/(?P<file>.+)$")


def test_every_hugging_face_source_is_pinned_to_a_commit():
    unpinned = set()
    for variant in BUILTIN_VARIANTS:
        match = HF_SOURCE.match(variant.weights)
        assert match, f"{variant.id}: {variant.weights} is not hf://<owner>/<repo>@<revision>/<file>"
        if not re.fullmatch(r"[0-9a-f]{40}", match["revision"]):
            unpinned.add(variant.id)
    assert not unpinned, f"pin these sources to a commit: {sorted(unpinned)}"


def test_v1_heavy_serves_the_massive_set_checkpoint():
    heavy = next(v for v in BUILTIN_VARIANTS if v.id == "v1-general-heavy")
    match = HF_SOURCE.match(heavy.weights)
    assert match and match["repo"] == "ZhengPeng7/BiRefNet-DIS5K-TR_TEs"
