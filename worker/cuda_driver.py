"""The NVIDIA driver floor of this worker's torch build, checked at start before any model loads.

A torch wheel brings its own CUDA runtime libraries (the `nvidia-*` wheels), but the driver comes from
the host. A driver older than the one that CUDA release needs makes `torch.cuda.is_available()` quietly
return False, and a worker asked for `cuda` would then crash-loop on "CUDA is not available". This
module says instead which driver was found and which one is needed, and the worker exits non-zero.

The pure part (`parse_version`, `required_driver`, `check_driver`) is unit-tested with fake versions; the
driver is read from NVML (`libnvidia-ml.so.1`, via ctypes: no extra dependency) or, failing that,
`/proc/driver/nvidia/version`, both of which the NVIDIA container toolkit provides in a container.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

Version = tuple[int, ...]

# Minimum Linux x86_64 driver for each CUDA release's GA, from the table "CUDA Toolkit and Corresponding
# Driver Versions" in NVIDIA's CUDA Toolkit Release Notes
# (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/). CUDA's minor-version compatibility lets
# some 12.x code run on drivers down to 525, but not all of it (no PTX JIT, no newer driver APIs), so
# the worker asks for the driver the toolkit release itself names.
MIN_DRIVER: dict[tuple[int, int], Version] = {
    (11, 8): (520, 61, 5),
    (12, 0): (525, 60, 13),
    (12, 1): (530, 30, 2),
    (12, 2): (535, 54, 3),
    (12, 3): (545, 23, 6),
    (12, 4): (550, 54, 14),
    (12, 5): (555, 42, 2),
    (12, 6): (560, 28, 3),
    (12, 8): (570, 26),
    (12, 9): (575, 51, 3),
    (13, 0): (580, 65, 6),
}

PROC_VERSION = Path("/proc/driver/nvidia/version")


class DriverTooOld(RuntimeError):
    """The worker was asked for CUDA but the host's driver cannot run this torch build's CUDA."""


def parse_version(text: str) -> Version:
    """'580.65.06' -> (580, 65, 6); '13.0' -> (13, 0)."""
    match = re.search(r"\d+(?:\.\d+)*", text)
    if match is None:
        raise ValueError(f"no version number in {text!r}")
    return tuple(int(part) for part in match.group(0).split("."))


def format_version(version: Version) -> str:
    return ".".join(f"{part:02d}" if index == 2 else str(part) for index, part in enumerate(version))


def required_driver(cuda: str) -> Version:
    """The minimum driver for a CUDA version such as torch.version.cuda ('13.0', '12.8')."""
    major, minor = (parse_version(cuda) + (0,))[:2]
    if (major, minor) in MIN_DRIVER:
        return MIN_DRIVER[(major, minor)]
    known = [key for key in MIN_DRIVER if key <= (major, minor)]
    if not known:
        raise ValueError(f"CUDA {cuda} is older than any this worker knows (11.8)")
    # A release newer than the table: at least the newest floor below it (the real one may be higher).
    log.warning(
        "CUDA %s is not in the driver table; assuming at least the floor of CUDA %d.%d", cuda, *max(known)
    )
    return MIN_DRIVER[max(known)]


@dataclass(frozen=True)
class DriverCheck:
    ok: bool
    cuda: str  # the CUDA version torch was built for
    needed: Version
    found: Version | None  # None: no NVIDIA driver could be read

    @property
    def message(self) -> str:
        need = f"NVIDIA driver >= {format_version(self.needed)} (torch built for CUDA {self.cuda})"
        if self.found is None:
            return (
                f"no NVIDIA driver found (no NVML, no {PROC_VERSION}); this worker needs {need}. "
                "On a GPU host, run the container with the NVIDIA container toolkit (--gpus all)."
            )
        if self.ok:
            return f"NVIDIA driver {format_version(self.found)} satisfies {need}"
        return (
            f"NVIDIA driver {format_version(self.found)} is too old: this worker needs {need}. "
            "Upgrade the driver, or use an image built for an older CUDA (build argument TORCH_INDEX_URL, "
            "e.g. https://download.pytorch.org/whl/cu126 for drivers >= 560)."
        )


def check_driver(cuda: str, driver: str | None) -> DriverCheck:
    """Pure: compare a driver version string (or None when none was read) with the floor for `cuda`."""
    needed = required_driver(cuda)
    found = parse_version(driver) if driver else None
    return DriverCheck(ok=found is not None and found >= needed, cuda=cuda, needed=needed, found=found)


def _nvml_driver() -> str | None:
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        buffer = ctypes.create_string_buffer(96)
        if nvml.nvmlSystemGetDriverVersion(buffer, ctypes.c_uint(len(buffer))) != 0:
            return None
        return buffer.value.decode() or None
    finally:
        nvml.nvmlShutdown()


def _proc_driver() -> str | None:
    try:
        text = PROC_VERSION.read_text()
    except OSError:
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.65.06  Sun Jul 27 ..."
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
    return match.group(1) if match else None


def read_driver_version() -> str | None:
    """The host's NVIDIA driver version, or None when there is none (or it is not visible here)."""
    return _nvml_driver() or _proc_driver()


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built for; None for a CPU-only build."""
    import torch

    return torch.version.cuda


def require_driver(
    device: str,
    *,
    cuda: Callable[[], str | None] | None = None,
    driver: Callable[[], str | None] | None = None,
) -> DriverCheck | None:
    """Called at worker start, before any model loads.

    `device` 'cpu' skips the check. 'auto' checks only when a driver is there (none: the worker runs on
    CPU, as 'auto' promises). 'cuda'/'cuda:N' always checks. Raises DriverTooOld with a message naming
    the driver found and the one needed."""
    if device == "cpu":
        return None
    found = (driver or read_driver_version)()
    if device == "auto" and found is None:
        return None
    built_for = (cuda or torch_cuda_version)()
    if built_for is None:
        if device == "auto":
            return None
        raise DriverTooOld(f"device {device!r} was asked for, but this worker's torch is a CPU-only build")
    result = check_driver(built_for, found)
    if not result.ok:
        raise DriverTooOld(result.message)
    log.info("%s", result.message)
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m worker.cuda_driver`: this torch's CUDA, the driver it needs, the driver found here.

    Exit 0 when the driver is enough (or none is needed), 3 when not, 2 when --expect-* disagree with
    the installed torch (the image build uses them to keep its labels honest)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m worker.cuda_driver", description=main.__doc__)
    parser.add_argument("--device", default="cuda", help="as BIREFNET_DEVICE: cpu, auto, cuda (default)")
    parser.add_argument("--expect-cuda", help="fail unless torch was built for this CUDA version")
    parser.add_argument("--expect-min-driver", help="fail unless this is the driver floor of torch's CUDA")
    parser.add_argument("--describe", action="store_true", help="print JSON facts only; no driver check")
    args = parser.parse_args(argv)
    cuda = torch_cuda_version()
    needed = format_version(required_driver(cuda)) if cuda else None
    if args.expect_cuda and cuda != args.expect_cuda:
        print(f"torch is built for CUDA {cuda}, not {args.expect_cuda}", file=sys.stderr)
        return 2
    if args.expect_min_driver and needed != format_version(parse_version(args.expect_min_driver)):
        print(f"CUDA {cuda} needs driver >= {needed}, not {args.expect_min_driver}", file=sys.stderr)
        return 2
    if args.describe:
        print(json.dumps({"torch_cuda": cuda, "min_nvidia_driver": needed}))
        return 0
    found = read_driver_version()
    print(f"torch CUDA: {cuda}; driver needed: >= {needed}; driver found: {found or 'none'}")
    try:
        result = require_driver(args.device, cuda=lambda: cuda, driver=lambda: found)
    except DriverTooOld as error:
        print(f"FAIL: {error}")
        return 3
    print(f"OK: {result.message}" if result else f"OK: no check needed for device {args.device!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
