"""Loads the test-only forward hook (tests/forward_hook.py) when `test_forward_hook` is set.

Guarded so it cannot be switched on by accident in production: the setting is named as a test setting and
documented as such, the hook's code lives in tests/ (not in the wheel, not in the images, so a production
worker cannot import it), and the worker refuses to start with it unless every variant it serves runs
untrained recipe weights, which no production deployment does. An active hook is logged as a warning.
"""

from __future__ import annotations

import importlib
import logging

from common.settings import Settings
from worker.batcher import ForwardHook

log = logging.getLogger(__name__)

HOOK_MODULE = "tests.forward_hook"


def load_forward_hook(settings: Settings, untrained: dict[str, bool]) -> ForwardHook | None:
    """The hook, or None when the setting is empty; raises RuntimeError when it may not be used here.
    `untrained`: variant id -> whether its loaded weights are untrained recipe weights."""
    if not settings.test_forward_hook:
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
    hook = module.ForwardHook.from_setting(settings.test_forward_hook)
    log.warning("TEST HOOK ACTIVE (BIREFNET_TEST_FORWARD_HOOK): some forwards hang or sleep on purpose: %s",
                hook.describe())
    return hook
