"""`python -m tests.helpers.hooked_worker --variants ...`: the worker's normal entry point (`python -m
worker`) with the testing-only hooks installed once its models are loaded. Product code never imports this.

Switches (environment, prefix BIREFNET_TEST_; every one off unless set):
- BIREFNET_TEST_FORWARD_HOOK: JSON rules for tests/forward_hook.py that make chosen forwards hang or take a
  set time (the hang and chaos tests). Refused unless every variant the worker serves runs untrained recipe
  weights, so it cannot make a real model misbehave; an active hook is logged as a warning.
- BIREFNET_TEST_UNSUPPORTED_OUTPUT_FORMATS: output formats (comma-separated, e.g. avif) the worker treats
  as unsupported even if its Pillow has them, to test the 422 a server without them answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.settings import parse_list
from tests.forward_hook import ForwardHook
from worker.engine import Predictor
from worker.pipeline.types import PreparedImage
from worker.runner import JobRunner

log = logging.getLogger(__name__)

InForward = Callable[[Sequence[PreparedImage]], None]


class HooksForTests(BaseSettings):
    """Switches only tests set; every one is off unless its variable is set."""

    model_config = SettingsConfigDict(env_prefix="BIREFNET_TEST_", env_file=".env", extra="ignore")

    unsupported_output_formats: Annotated[tuple[str, ...], NoDecode] = Field(())
    forward_hook: str = ""

    @field_validator("unsupported_output_formats", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        return parse_list(value)


def load_forward_hook(hooks: HooksForTests, untrained: dict[str, bool]) -> ForwardHook | None:
    """The hook, or None when the setting is empty; raises RuntimeError when it may not be used here.
    `untrained`: variant id -> whether its loaded weights are untrained recipe weights."""
    if not hooks.forward_hook:
        return None
    trained = sorted(variant for variant, is_untrained in untrained.items() if not is_untrained)
    if trained or not untrained:
        raise RuntimeError(
            f"BIREFNET_TEST_FORWARD_HOOK is a testing aid and needs untrained recipe weights; "
            f"this worker serves trained weights for {trained}: unset it"
        )
    hook = ForwardHook.from_setting(hooks.forward_hook)
    log.warning(
        "TEST HOOK ACTIVE (BIREFNET_TEST_FORWARD_HOOK): some forwards hang or sleep on purpose: %s",
        hook.describe(),
    )
    return hook


def install_forward_hook(predictor: Predictor, hook: InForward) -> None:
    """Run `hook(prepared images)` inside every forward of `predictor`, before the network (on the batcher's
    thread, where a hang counts as a stuck forward)."""
    forward = predictor.forward

    def hooked(prepared: Sequence[PreparedImage]) -> list:
        hook(prepared)
        return forward(prepared)

    predictor.forward = hooked  # type: ignore[method-assign]


def install(runner: JobRunner, hooks: HooksForTests) -> None:
    """Apply `hooks` to a loaded worker's runner (the worker's `on_loaded`)."""
    hook = load_forward_hook(hooks, {v: p.untrained for v, p in runner.predictors.items()})
    if hook is not None:
        for predictor in {id(p): p for p in runner.predictors.values()}.values():  # shared networks: once
            install_forward_hook(predictor, hook)
    runner.output_formats = runner.output_formats - set(hooks.unsupported_output_formats)


def main() -> None:
    from worker.__main__ import main as worker_main

    hooks = HooksForTests()
    worker_main(on_loaded=lambda runner: install(runner, hooks))


if __name__ == "__main__":
    main()
