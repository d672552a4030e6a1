"""The interface every backend implements, and the pure helpers they share.

A backend runs one engine ("embedder", "brick0", "brick1", ...) on tensors the
brick chain owns.  Lifecycle, as Polygraphy's runners::

    with SomeBackend(...) as backend:           # load: sessions / engines / model, once
        backend.bind(shape)                      # once per (rows, H, W): set shapes, drop stale bindings
        backend.infer(call, inputs, outputs)     # per engine call, on the bound buffers

``inputs`` and ``outputs`` map the engine's tensor names (DESIGN.md, "Engine
contract") to torch tensors of the chain; a backend may cache whatever it
derives from them per ``call`` until the next :meth:`Backend.bind`, because
the chain hands the same tensors for the same call and shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from export.manifest import TORCH_DTYPES
from lego_model.configs import LegoConfig
from runtimes.errors import BackendError

if TYPE_CHECKING:
    from export.manifest import EngineEntry


@dataclass(frozen=True)
class EngineCall:
    """One engine run inside a denoiser call: which engine, where f_prev comes from, where the output goes.

    ``src`` is None for engines without ``f_prev`` (the embedder, brick 0),
    ``"zeros"`` for the first active brick when brick 0 is skipped, else the
    ping-pong buffer ``"f0"``/``"f1"`` the previous active brick wrote.  The
    chain hands the same call object with the same tensors every time, so a
    backend may key per-call state (I/O bindings) by it.
    """

    engine: str
    brick: int | None
    src: str | None
    dst: str


@dataclass(frozen=True)
class BoundShape:
    """The shape a backend is bound to: engine batch rows (2x the images under guidance), height, width."""

    rows: int
    height: int
    width: int


@dataclass(frozen=True)
class BufferDtypes:
    """dtype of each tensor the chain allocates, as the engines want them."""

    c_noise: torch.dtype = torch.float32
    class_labels: torch.dtype = torch.float32
    cond: torch.dtype = torch.float32
    x_in: torch.dtype = torch.float32
    f: torch.dtype = torch.float32


def buffer_dtypes(entries: Mapping[str, EngineEntry]) -> BufferDtypes:
    """Buffer dtypes read from the engines' I/O specs; refuses engines that disagree about a shared tensor.

    ``cond`` is written by the embedder and read by every brick, and ``f`` is
    written by brick k and read as ``f_prev`` by the next active brick, so each
    must have one dtype across all engines.
    """
    seen: dict[str, set[str]] = {}
    for entry in entries.values():
        for spec in [*entry.inputs, *entry.outputs]:
            key = "f" if spec.name == "f_prev" else spec.name
            seen.setdefault(key, set()).add(spec.dtype)
    for key, kinds in seen.items():
        if len(kinds) > 1:
            raise BackendError(
                f"engines disagree on the dtype of {key!r} ({', '.join(sorted(kinds))}); "
                "re-export all engines with one --precision"
            )
    fields = BufferDtypes.__dataclass_fields__
    return BufferDtypes(**{k: TORCH_DTYPES[next(iter(v))] for k, v in seen.items() if k in fields})


def check_engine_set(entries: Mapping[str, EngineEntry], config: LegoConfig, fmt: str) -> None:
    """Refuse a directory that lacks the embedder or a brick in the requested format."""
    needed = ["embedder", *(f"brick{k}" for k in range(config.num_bricks))]
    missing = [n for n in needed if n not in entries]
    if missing:
        raise BackendError(
            f"the engine directory has no {fmt} engine for {', '.join(missing)}; "
            f"export them with lego-export --engines {'trt' if fmt == 'tensorrt' else 'onnx'}"
        )


class Backend:
    """One way of running the embedder and brick engines; subclasses fill in the hooks below."""

    name: str = "backend"
    precision: str = "fp32"
    precision_why: str = "the precision the engines were exported in"
    supports_cuda_graphs: bool = False

    def __init__(self, config: LegoConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtypes = BufferDtypes()
        self.shape: BoundShape | None = None

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Backend:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def load(self) -> None:
        """Create sessions / engines / model; called once by ``__enter__``."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what :meth:`load` created."""
        raise NotImplementedError

    # ---------------------------------------------------------------- per shape / per call
    def check_shape(self, rows: int, height: int, width: int) -> None:
        """Raise a ShapeError naming the supported range when an engine cannot take this shape."""
        self.config.check_image_size(height, width)

    def max_rows(self) -> int | None:
        """Largest batch (in engine rows) every engine takes; None when unlimited."""
        return None

    def bind(self, shape: BoundShape) -> None:
        """Prepare for calls at ``shape``; cached per-call state of another shape is dropped."""
        self.check_shape(shape.rows, shape.height, shape.width)
        self.shape = shape

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        """Run engine ``call.engine`` reading ``inputs`` and writing into ``outputs`` (no allocation of I/O)."""
        raise NotImplementedError


class EngineBackend(Backend):
    """A backend of exported engines (``entries``, by engine name): shapes are bounded by their profiles."""

    entries: Mapping[str, EngineEntry]

    def check_shape(self, rows: int, height: int, width: int) -> None:
        super().check_shape(rows, height, width)
        for entry in self.entries.values():
            entry.profile.check(rows, height, width)

    def max_rows(self) -> int | None:
        return min(e.profile.batch[2] for e in self.entries.values())


def require_cuda(what: str, device_index: int = 0) -> torch.device:
    """The CUDA device ``device_index`` or a BackendError saying what needs it."""
    if not torch.cuda.is_available():
        raise BackendError(f"{what} needs a CUDA GPU and none is visible; use --backend onnxruntime-cpu or torch")
    if device_index >= torch.cuda.device_count():
        raise BackendError(
            f"{what}: device {device_index} requested (LOCAL_RANK) but only "
            f"{torch.cuda.device_count()} GPUs are visible"
        )
    return torch.device("cuda", device_index)
