"""The interface every backend implements, and the pure helpers they share.

A backend runs one engine ("embedder", "brick0", "brick1", ...) on tensors the
brick chain owns.  Lifecycle, as Polygraphy's runners::

    with SomeBackend(...) as backend:           # load: sessions / engines / model, once
        backend.infer(call, inputs, outputs)     # per engine call, on the caller's buffers

``inputs`` and ``outputs`` map the engine's tensor names (DESIGN.md, "Engine
contract") to torch tensors of the caller (a chain's buffers).  Whatever a
backend derives from them (ONNX Runtime I/O bindings, TensorRT input shapes)
it caches keyed by the buffers themselves -- data pointer, shape and dtype of
every tensor (:func:`buffers_key`) -- in a bounded cache it owns, so any
number of chains, and callers with tensors of their own, may share one
backend: handed other buffers, it rebinds.  Nothing is keyed by the call
alone, and no caller tells a backend when to rebind.

Threads: ``infer`` may be called from several threads on distinct buffers
(the binding cache is locked; ONNX Runtime's ``run`` is thread-safe); one set
of buffers must not be used by two threads at once, which the chain ensures
with its own lock.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from export.records import TORCH_DTYPES
from lego_model.configs import LegoConfig
from runtimes.cuda import TORCH_CUDA, Cuda
from runtimes.errors import BackendError, UsageError

if TYPE_CHECKING:
    from export.records import EngineEntry


@dataclass(frozen=True)
class EngineCall:
    """One engine run inside a denoiser call: which engine, where f_prev comes from, where the output goes.

    ``src`` is None for engines without ``f_prev`` (the embedder, brick 0),
    ``"zeros"`` for the first active brick when brick 0 is skipped, else the
    ping-pong buffer ``"f0"``/``"f1"`` the previous active brick wrote.  It
    names the slots of a chain's buffer set, not the tensors: a backend keys
    its bindings by the tensors it is handed (:func:`buffers_key`).
    """

    engine: str
    brick: int | None
    src: str | None
    dst: str


def buffers_key(engine: str, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> Hashable:
    """What a binding of ``engine`` to these tensors depends on: per tensor its name, data pointer, shape, dtype.

    Two calls with equal keys may share a binding (it points at the same
    memory, read as the same shape and dtype); any other change of buffers
    gives another key, hence a new binding.
    """
    return (
        engine,
        tuple((n, t.data_ptr(), tuple(t.shape), t.dtype, t.device) for n, t in inputs.items()),
        tuple((n, t.data_ptr(), tuple(t.shape), t.dtype, t.device) for n, t in outputs.items()),
    )


class BindingCache:
    """A bounded, locked LRU cache of bindings by :func:`buffers_key`; ``get(key, make)`` builds on a miss.

    Bounded because callers' buffers come and go (a chain evicts buffer sets,
    callers pass tensors of their own): a binding whose buffers were freed is
    only ever reused by buffers with the same pointer, shape and dtype, for
    which it is exactly right, and the oldest are dropped past ``size``.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, object] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, make: Callable[[], object]) -> object:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
            found = self._items[key] = make()
            self.misses += 1
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return found

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


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
    cuda: Cuda = TORCH_CUDA  # the CUDA calls of this backend, its chains and their graphs (a fake in tests)

    def __init__(self, config: LegoConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtypes = BufferDtypes()
        self.loaded = False
        self.generation = 0  # loads so far: CUDA graphs captured under an earlier load point at released engines

    # ---------------------------------------------------------------- lifecycle
    def __enter__(self) -> Backend:
        self.load()
        self.loaded = True
        self.generation += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.loaded = False
        self.close()

    def require_loaded(self) -> None:
        """Refuse engine calls before ``with backend:`` loaded it (or after it closed)."""
        if not self.loaded:
            raise UsageError(
                f"the {self.name} backend is not loaded: run engines inside `with backend:` "
                "(or use runtimes.Generator, which loads its backend)"
            )

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

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        """Run engine ``call.engine`` reading ``inputs`` and writing into ``outputs`` (no allocation of I/O).

        Any tensors may be handed (contiguous, on :attr:`device`, of the
        engine's dtypes); the backend rebinds when they differ from the last
        ones it bound for this engine.  Call it inside ``with backend:``.
        """
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
