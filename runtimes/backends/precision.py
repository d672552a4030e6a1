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

int8 is a precision of the files, not of the run: ``lego-export --precision
int8`` writes QDQ bricks whose quantized products every CPU runtime executes in
int8 (:func:`files_precision` names a directory's precision).  Such files run
as int8 (``auto`` or ``int8``; the ops left in float run in bf16 where the CPU
has bf16 units, :func:`int8_rest_precision`), and ``int8`` asked of fp32 files
is refused with the export that makes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from runtimes.cuda import TORCH_CUDA, Cuda
from runtimes.errors import BackendError

if TYPE_CHECKING:
    from export.records import EngineEntry

PRECISIONS = ("auto", "fp32", "bf16", "int8")
INT8 = "int8"
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


def files_precision(entries: Mapping[str, EngineEntry]) -> str:
    """The precision an engine directory's files were exported in: ``int8`` when its bricks are int8 (the
    embedder of an int8 export is fp32 by design, export.quantize), else the files' precisions, "/"-joined."""
    if any(e.precision == INT8 for e in entries.values() if e.kind == "brick"):
        return INT8
    return "/".join(sorted({e.precision for e in entries.values()}))


def bf16_units(device: torch.device, cuda: Cuda = TORCH_CUDA) -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 natively, and the words that say so."""
    if cuda.is_device(device):
        return gpu_bf16_units(device, cuda)
    found = cpu_bf16_units()
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has no bf16 units (no AMX, no AVX512-BF16)"


def int8_rest_precision(device: torch.device, cuda: Cuda = TORCH_CUDA) -> tuple[str, str]:
    """(precision, why) of the ops an int8 file leaves in float: bf16 where the hardware has native bf16 units,
    else fp32.

    The quantized products dominate the time; what stays float (the adaLN and
    patch-embedding products, softmax times v, LayerNorm, GELU) ran 1.15x
    faster in bf16 than in fp32 on lego_S_PG_64 (OpenVINO, AVX512-BF16, one thread).
    """
    has_bf16, units = bf16_units(device, cuda)
    return ("bf16" if has_bf16 else "fp32"), units


def resolve_precision(
    requested: str, device: torch.device, *, auto_bf16: bool = True, cuda: Cuda = TORCH_CUDA, files: str = "fp32"
) -> tuple[str, str]:
    """(precision, why) for ``requested`` in :data:`PRECISIONS` on ``device``, for files of precision ``files``.

    ``auto`` is bf16 where the hardware has native bf16 units and ``auto_bf16``
    (the backend's default leans to bf16), else fp32.  ``bf16`` where there are
    no such units raises a BackendError that offers fp32.  int8 files
    (``files="int8"``) run as int8 for ``auto`` and ``int8`` (the float ops at
    :func:`int8_rest_precision`); fp32 or bf16 asked of them, or int8 of other
    files, raises a BackendError naming the export that fits.
    """
    if requested not in PRECISIONS:
        raise BackendError(f"unknown precision {requested!r}; choose one of {', '.join(PRECISIONS)}")
    if files == INT8:
        if requested not in ("auto", INT8):
            raise BackendError(
                f"--precision {requested} asked, but these engines are int8 files (lego-export --precision int8), "
                f"which run in int8: pass --precision int8 (or auto), or re-export with --precision fp32 for "
                f"{requested} at run time"
            )
        rest, units = int8_rest_precision(device, cuda)
        return INT8, f"{'auto: ' if requested == 'auto' else ''}int8 files, their float ops in {rest}: {units}"
    if requested == INT8:
        raise BackendError(
            f"--precision int8 needs int8 engine files, these are {files}: re-export with lego-export --precision "
            "int8 (pip install -e '.[int8]'), or pass --precision auto"
        )
    has_bf16, units = bf16_units(device, cuda)
    if requested == "fp32":
        return "fp32", "requested"
    if requested == "bf16":
        if not has_bf16:
            raise BackendError(f"--precision bf16 asked, but {units}: bf16 would be emulated; use --precision fp32")
        return "bf16", f"requested, {units}"
    if auto_bf16 and has_bf16:
        return "bf16", f"auto: {units}"
    return "fp32", f"auto: {units}" if not has_bf16 else "auto: fp32 is this backend's default"
