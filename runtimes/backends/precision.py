"""Run-time precision of the backends that choose it when they load (OpenVINO, torch): fp32 or bf16.

bf16 is only worth running on hardware that multiplies bf16 natively: on a
CPU that means AMX tiles (``amx_bf16``) or the AVX512-BF16 dot-product
instructions (``avx512_bf16``); on an NVIDIA GPU, tensor cores of compute
capability 8.0 (Ampere) or newer.  Elsewhere bf16 is emulated through fp32
and runs slower than fp32 itself (``torch.cuda.is_bf16_supported()`` counts
that emulation as support, and asks about the current device rather than the
backend's, so it is not used).  ``auto`` therefore takes bf16 only where those
units exist, and an explicit ``bf16`` without them is refused with the fp32
alternative.
"""

from __future__ import annotations

from pathlib import Path

import torch

from runtimes.cuda import TORCH_CUDA, Cuda
from runtimes.errors import BackendError

PRECISIONS = ("auto", "fp32", "bf16")
GPU_BF16_CAPABILITY = (8, 0)  # bf16 tensor cores: Ampere (sm_80) and newer
# /proc/cpuinfo flags of the CPU's native bf16 units, in the order the summary names them.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_bf16_units() -> list[str]:
    """The native bf16 units of this CPU as /proc/cpuinfo names them (empty where there are none or no cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in BF16_FLAGS if f in flags]
    return []


def gpu_bf16_units(device: torch.device, cuda: Cuda = TORCH_CUDA) -> tuple[bool, str]:
    """(whether the GPU ``device`` multiplies bf16 natively, a phrase saying so) from its compute capability."""
    name, major, minor = cuda.properties(device)
    if (major, minor) >= GPU_BF16_CAPABILITY:
        return True, f"{name} (compute capability {major}.{minor}) has bf16 tensor cores"
    return False, f"{name} is compute capability {major}.{minor}: bf16 tensor cores need 8.0 (Ampere) or newer"


def resolve_precision(
    requested: str, device: torch.device, *, auto_bf16: bool = True, cuda: Cuda = TORCH_CUDA
) -> tuple[str, str]:
    """(precision, why) for ``requested`` in :data:`PRECISIONS` on ``device``.

    ``auto`` is bf16 where the hardware has native bf16 units and ``auto_bf16``
    (the backend's default leans to bf16), else fp32.  ``bf16`` where there are
    no such units raises a BackendError that offers fp32.
    """
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if cuda.is_device(device):
        has_bf16, units = gpu_bf16_units(device, cuda)
    else:
        found = cpu_bf16_units()
        has_bf16 = bool(found)
        units = f"the CPU has {' and '.join(found)}" if found else "the CPU has no bf16 units (no AMX, no AVX512-BF16)"
    if requested == "fp32":
        return "fp32", "requested"
    if requested == "bf16":
        if not has_bf16:
            raise BackendError(f"--precision bf16 asked, but {units}: bf16 would be emulated; use --precision fp32")
        return "bf16", f"requested, {units}"
    if auto_bf16 and has_bf16:
        return "bf16", f"auto: {units}"
    return "fp32", f"auto: {units}" if not has_bf16 else "auto: fp32 is this backend's default"
