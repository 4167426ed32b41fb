"""Test-only: a forward that hangs or takes a set time, whatever the CPU (installed by
tests/helpers/hooked_worker.py).

Tests used to make jobs slow with big random images, a premise that a faster machine breaks. This hook
makes the forward of a chosen image take exactly as long as the test needs instead. Images are chosen by
width (a width no other test image has), so one worker can run hung, slow and normal jobs side by side.

`BIREFNET_TEST_FORWARD_HOOK` (JSON):
    {"dir": "/tmp/run", "rules": [{"width": 61, "seconds": null, "times": 1},
                                  {"width": 62, "seconds": 9}]}
`seconds`: how long the forward takes (null: it never returns). `times`: how many forwards the rule affects,
counted across every worker process sharing `dir` (absent: every one).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from worker.pipeline.types import PreparedImage


@dataclass(frozen=True)
class Rule:
    width: int
    seconds: float | None = None  # None: hang for good
    times: int | None = None  # None: every matching forward


def hook_setting(directory: Path | str, *rules: Rule) -> str:
    """The value of BIREFNET_TEST_FORWARD_HOOK for these rules."""
    return json.dumps({"dir": str(directory), "rules": [rule.__dict__ for rule in rules]})


class ForwardHook:
    def __init__(self, directory: Path, rules: Sequence[Rule]):
        self.directory, self.rules = directory, list(rules)

    @classmethod
    def from_setting(cls, text: str) -> ForwardHook:
        data = json.loads(text)
        return cls(Path(data["dir"]), [Rule(**rule) for rule in data["rules"]])

    def describe(self) -> str:
        return "; ".join(
            f"width {r.width}: {'hang' if r.seconds is None else f'{r.seconds}s'}"
            f"{'' if r.times is None else f' x{r.times}'}"
            for r in self.rules
        )

    def _take(self, rule: Rule) -> bool:
        """Whether this forward is one of the rule's `times` (an O_EXCL file per use, shared by processes)."""
        if rule.times is None:
            return True
        self.directory.mkdir(parents=True, exist_ok=True)
        for n in range(rule.times):
            try:
                os.close(os.open(self.directory / f"forward-hook-{rule.width}-{n}", os.O_CREAT | os.O_EXCL))
                return True
            except FileExistsError:
                continue
        return False

    def __call__(self, images: Sequence[PreparedImage]) -> None:
        for image in images:
            width = image.size[0]  # of the decoded image (a video's frame)
            for rule in self.rules:
                if width == rule.width and self._take(rule):
                    if rule.seconds is None:
                        threading.Event().wait()  # never returns: a forward that hangs
                    time.sleep(rule.seconds)
