"""Testing-only switches of the worker (`HooksForTests`, env prefix BIREFNET_TEST_), kept out of the
production Settings, and the loader of the test-only forward hook (tests/forward_hook.py).

The forward hook is guarded so it cannot be switched on by accident in production: its variable is named
as a test switch and documented as such, the hook's code lives in tests/ (not in the wheel, not in the images, so a production
worker cannot import it), and the worker refuses to start with it unless every variant it serves runs
untrained recipe weights, which no production deployment does. An active hook is logged as a warning.
"""

from __future__ import annotations

import importlib
import logging
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from common.settings import parse_list
from worker.batcher import ForwardHook

log = logging.getLogger(__name__)

HOOK_MODULE = "tests.forward_hook"


class HooksForTests(BaseSettings):
    """Switches only tests and benchmarks set; every one is off unless its variable is set."""

    model_config = SettingsConfigDict(env_prefix="BIREFNET_TEST_", env_file=".env", extra="ignore")

    unsupported_output_formats: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="Output formats (comma-separated, e.g. avif) workers treat as unsupported even if "
        "their Pillow has them, to test the 422 a server without them answers."
    )
    operating_resolution: str = Field(
        "", pattern=r"^(\d+x\d+)?$", description="Workers run every job's forward pass at this WIDTHxHEIGHT "
        "(e.g. 128x128) instead of its operating_resolution, so CPU chaos and load tests finish in minutes; "
        "every job's logs say so."
    )
    forward_hook: str = Field(
        "", description="JSON rules for tests/forward_hook.py that make chosen forwards hang or take a set "
        "time (the hang and chaos tests)."
    )

    @field_validator("unsupported_output_formats", mode="before")
    @classmethod
    def _list(cls, value: object) -> object:
        return parse_list(value)

    @classmethod
    def off(cls) -> HooksForTests:
        """Every switch off, whatever the environment says (library callers and unit tests)."""
        return cls.model_construct()


def load_forward_hook(hooks: HooksForTests, untrained: dict[str, bool]) -> ForwardHook | None:
    """The hook, or None when the setting is empty; raises RuntimeError when it may not be used here.
    `untrained`: variant id -> whether its loaded weights are untrained recipe weights."""
    if not hooks.forward_hook:
        return None
    trained = sorted(variant for variant, is_untrained in untrained.items() if not is_untrained)
    if trained or not untrained:
        raise RuntimeError(f"BIREFNET_TEST_FORWARD_HOOK is a testing aid and needs untrained recipe weights; "
                           f"this worker serves trained weights for {trained}: unset it")
    try:
        module = importlib.import_module(HOOK_MODULE)
    except ImportError as exc:
        raise RuntimeError(f"BIREFNET_TEST_FORWARD_HOOK is set but {HOOK_MODULE} cannot be imported ({exc}); "
                           "it exists only in a source checkout, for tests: unset it") from None
    hook = module.ForwardHook.from_setting(hooks.forward_hook)
    log.warning("TEST HOOK ACTIVE (BIREFNET_TEST_FORWARD_HOOK): some forwards hang or sleep on purpose: %s",
                hook.describe())
    return hook
