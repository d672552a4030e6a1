"""CUDA graphs of the brick chain: one denoiser call, or a whole sampling loop, captured once per key and replayed.

A graph records kernels with fixed pointers, shapes and scalar arguments, so
anything that changes one of them selects another graph.  A denoiser call's
key (:class:`GraphKey`) holds the batch, the image size, the active brick set
(a skipped brick is absent from the recorded call) and whether guidance
doubles the rows; a whole run's key (:class:`LoopKey`) adds the solver, the
step count, the schedule and churn, and the per-step brick sets.  Values that
change between runs (x or the latents, sigma, the churn noise, the guidance
scale, the class labels) are not in any key: they live in buffers the graph
reads at every replay (gpt-fast's static inputs), which outlive the graphs.

The first call of a key runs eagerly (cuBLAS handles, TensorRT's first-enqueue
work and autotuning happen there, outside any capture: trtexec's "enqueue once
before capturing") and its result is the result of that call; the capture
that follows records without executing.

Threads and devices.  Everything graphs touch is shared per device: their
memory pool and, for TensorRT, the engines' scratch memory.  So each device
has one :class:`DeviceLane` -- a lock and a stream, shared by every chain and
backend of the process -- and warm-ups, captures, replays and TensorRT
enqueues run on the lane's stream while holding its lock, ordered after and
before the caller's current stream with events (no host wait).  Work from
two threads therefore never overlaps on the device, and a graph is never
captured while another thread's work is recorded.  Captures also hold one
process-wide lock, as PyTorch allows one capture at a time per process
(torch.cuda.graph docs).  Graphs are safe to use from several threads; their
replays are serialised, not parallel.

Memory.  All graphs of a device allocate their temporaries from the lane's
pool.  Sharing a pool is safe when replays never overlap (one stream) and
nothing allocated inside a capture is still alive after it (PyTorch notes,
"Graph memory management"): that is checked after every capture, and a
capture that broke it is refused rather than kept.

TensorRT contexts a capture enqueued are kept alive with its graph
(:func:`hold_for_graph`): a graph replays their kernels and internal state.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lego_model.sampler import LoopSpec
from runtimes.cuda import TORCH_CUDA, Cuda, stream_section
from runtimes.errors import BackendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphKey:
    """Everything a captured denoiser call depends on besides the contents of its buffers."""

    batch: int
    height: int
    width: int
    active: tuple[int, ...]
    guided: bool

    @classmethod
    def of(cls, batch: int, height: int, width: int, active: Sequence[int], guided: bool) -> GraphKey:
        """Normalised key: the active set sorted and de-duplicated."""
        return cls(
            batch=int(batch),
            height=int(height),
            width=int(width),
            active=tuple(sorted(set(int(k) for k in active))),
            guided=bool(guided),
        )


@dataclass(frozen=True)
class LoopKey:
    """Everything a captured sampling loop depends on besides the contents of its buffers.

    ``spec`` holds the shape, the solver, the step count, the schedule and churn
    (their coefficients are kernel arguments in the graph) and the per-step brick sets.
    """

    spec: LoopSpec
    guided: bool


# PyTorch: "only one capture may be underway at a time in the process".
_CAPTURE_LOCK = threading.Lock()
_held = threading.local()


def hold_for_graph(obj: Any) -> None:
    """Keep ``obj`` alive as long as the graph being warmed up and captured on this thread (else nothing).

    Backends call it for what a graph's kernels keep pointing at and the
    backend might otherwise drop (a TensorRT execution context evicted from its
    cache); held from the warm-up on, the warm-up's objects are there for the capture.
    """
    held = getattr(_held, "objects", None)
    if held is not None:
        held.append(obj)


class DeviceLane:
    """The lock and the stream of one device through which all graph and TensorRT work of the process goes."""

    def __init__(self, device: torch.device, cuda: Cuda) -> None:
        self.device, self.cuda = device, cuda
        self.lock = threading.RLock()
        with cuda.device_guard(device):
            self.stream = cuda.new_stream(device)  # never the legacy default stream
            self.pool = cuda.new_pool(device)

    @classmethod
    def of(cls, device: torch.device, cuda: Cuda = TORCH_CUDA) -> DeviceLane:
        """The lane of ``device`` (made on first use; one per device and process)."""
        device = torch.device(device.type, device.index or 0)  # "cuda" and "cuda:0" are one GPU, one lane
        with _LANES_LOCK:
            lanes = _LANES.setdefault(cuda, {})
            lane = lanes.get(device)
            if lane is None:
                lane = lanes[device] = cls(device, cuda)
            return lane

    @contextlib.contextmanager
    def enter(self) -> Iterator[Any]:
        """Hold the lane: work inside runs on its stream, after the caller's stream's work, and before the
        caller's later work (events both ways, no host wait).  Re-entrant on one thread."""
        with self.lock, self.cuda.device_guard(self.device):
            if self.cuda.capturing():
                yield self.stream  # recording on the lane already (captures only happen inside it)
                return
            with stream_section(self.cuda, self.stream, self.device) as stream:
                yield stream


_LANES: weakref.WeakKeyDictionary[Cuda, dict[torch.device, DeviceLane]] = weakref.WeakKeyDictionary()
_LANES_LOCK = threading.Lock()


@dataclass
class _Captured:
    graph: Any
    held: tuple[Any, ...]  # objects the graph's kernels point into (TensorRT contexts)
    generation: int  # the backend load it was captured under


class CudaGraphCache:
    """Captured graphs of one chain, by key; ``run(key, step)`` replays, or runs ``step`` and captures it.

    Thread-safe (through the device's :class:`DeviceLane`); the chain also
    discards graphs whose buffers it drops (:meth:`discard`).
    """

    def __init__(self, device: torch.device, cuda: Cuda = TORCH_CUDA) -> None:
        self.device = device
        self.cuda = cuda
        self.lane = DeviceLane.of(device, cuda)
        self._graphs: dict[Hashable, _Captured] = {}
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def discard(self, which: Callable[[Hashable], bool]) -> int:
        """Drop the graphs whose key ``which`` accepts (their buffers are going away); returns how many."""
        with self.lane.lock:
            gone = [k for k in self._graphs if which(k)]
            for k in gone:
                del self._graphs[k]
            return len(gone)

    def run(self, key: Hashable, step: Callable[[], None], *, generation: int = 0) -> None:
        """Replay the graph of ``key``; on its first use run ``step`` (the real call), then capture it.

        ``generation`` is the backend's load count: a graph captured before the
        backend was closed and loaded again points at freed engines and is recaptured.
        """
        with self.lane.enter():
            found = self._graphs.get(key)
            if found is not None and found.generation == generation:
                found.graph.replay()
                self.replays += 1
                return
            self._graphs.pop(key, None)
            _held.objects = held = []
            try:
                step()  # warm-up; its outputs are this call's result
                self._capture(key, step, generation, held)
            finally:
                _held.objects = None

    def _capture(self, key: Hashable, step: Callable[[], None], generation: int, held: list[Any]) -> None:
        cuda, lane = self.cuda, self.lane
        graph = cuda.new_graph()
        with _CAPTURE_LOCK:
            with cuda.capture(graph, pool=lane.pool, stream=lane.stream):
                step()
            live = cuda.pool_live_bytes(lane.pool)
        if live:
            # Another capture into this pool may hand that memory out again, and replays would overwrite it.
            raise BackendError(
                f"{live} bytes allocated inside the CUDA graph capture of {key} are still alive after it; "
                "graphs of this device share one memory pool, so this graph was not kept. This is a bug of the "
                "backend's infer(); run with cuda_graphs=False (--no-cuda-graphs) meanwhile"
            )
        self._graphs[key] = _Captured(graph, tuple({id(o): o for o in held}.values()), generation)
        self.captures += 1
        log.debug("captured CUDA graph %s (%d cached)", key, len(self._graphs))
