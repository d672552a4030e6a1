"""A fake GPU for CPU tests: :class:`FakeCuda` has the methods of :class:`runtimes.cuda.Cuda` and keeps the rules
of CUDA and of PyTorch's CUDA graphs, raising :class:`FakeCudaError` where one is broken.

Its "device memory" is host memory (tensors on ``cpu``), so backends and chains built on it run for real.

* Streams carry vector clocks.  Work on a stream is ordered after everything its clock covers: ``wait_stream``
  (an event recorded on one stream, waited on by another) merges clocks, ``synchronize`` makes the host wait.
  :meth:`FakeCuda.access` reports two uses of one resource on streams neither of which waited for the other:
  on a GPU they may run at the same time (the fake TensorRT checks its scratch memory this way).
* Stream 0 is the legacy default stream, each thread's current stream until it chooses another.
* A capture records instead of running, as a CUDA graph does: every aten op of the capturing thread goes into
  the graph with the tensors it touched and the Python scalars it was given (baked in, as kernel arguments
  are); in-place and ``out=`` ops are not executed at capture; outputs of other ops become the graph's own
  memory.  A replay runs the record on the tensors' current contents.  Rules (CUDA programming guide, stream
  capture; PyTorch notes, CUDA graphs): one capture at a time per process, never on the legacy default
  stream, no host read of device values (``.item()``, ``nonzero``, a stream or device synchronise) and no
  draw from a generator of one's own inside a capture, and work enqueued through the fake (TensorRT) on a
  stream that is not part of the capture is refused.
* Pools: :meth:`pool_live_bytes` counts tensors made inside captures into a pool that are still alive after
  their capture ended -- memory the next capture into that pool may hand out again.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


class FakeCudaError(AssertionError):
    """A rule of CUDA, of PyTorch's CUDA graphs or of TensorRT was broken (on a GPU: wrong results or a crash)."""


# Ops whose result the host needs (a value, or an output size that depends on values): a synchronisation.
HOST_READS = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "unique", "_unique2", "equal"}


class FakeStream:
    """A stream with the methods of torch.cuda.Stream that the runtime uses."""

    def __init__(self, cuda: FakeCuda, handle: int) -> None:
        self.cuda = cuda
        self.cuda_stream = handle
        self.clock: dict[int, int] = {}
        self.captured_by: _Capture | None = None  # joined into a capture (waited on the capturing stream)

    def __repr__(self) -> str:
        return "legacy default stream 0" if self.cuda_stream == 0 else f"stream {self.cuda_stream}"

    def tick(self) -> dict[int, int]:
        """One operation on this stream: its timestamp (after the host's knowledge, see synchronize)."""
        with self.cuda.lock:
            for k, v in self.cuda.host_clock.items():
                self.clock[k] = max(self.clock.get(k, 0), v)
            self.clock[self.cuda_stream] = self.clock.get(self.cuda_stream, 0) + 1
            return dict(self.clock)

    def wait_stream(self, other: FakeStream) -> None:
        """Order later work on this stream after the work enqueued on ``other`` so far (record + wait event)."""
        cap = self.cuda._capture
        if cap is not None and other.captured_by is cap:
            if self.captured_by is None:  # fork into the capture, as cudaStreamWaitEvent on a capturing stream's event
                self.captured_by = cap
                cap.joined.append(self)
            if self is cap.stream:
                cap.unjoined.discard(other)  # joined back
        with self.cuda.lock:
            for k, v in other.clock.items():
                self.clock[k] = max(self.clock.get(k, 0), v)

    def synchronize(self) -> None:
        self.cuda.refuse_host_wait(f"{self}.synchronize()")
        with self.cuda.lock:
            for k, v in self.clock.items():
                self.cuda.host_clock[k] = max(self.cuda.host_clock.get(k, 0), v)


@dataclass
class FakePool:
    """A graph memory pool: the captures that allocated from it."""

    id: int
    captures: list[_Capture] = field(default_factory=list)


@dataclass(eq=False)
class _Capture:
    graph: FakeGraph
    pool: FakePool
    stream: FakeStream
    thread: int
    recorder: _Recorder | None = None
    joined: list[FakeStream] = field(default_factory=list)  # streams forked into the capture
    unjoined: set[FakeStream] = field(default_factory=set)  # forked streams with work not yet joined back


class FakeGraph:
    """A recorded sequence of ops and fake-device work; ``replay`` runs it on the current stream."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.items: list[tuple] = []
        self._pool: FakePool | None = None
        self.replays = 0

    def pool(self) -> FakePool | None:
        return self._pool

    def replay(self) -> None:
        cuda = self.cuda
        if cuda._capture is not None and cuda._capture.thread == threading.get_ident():
            raise FakeCudaError("a CUDA graph replayed inside another graph's capture")
        stream = cuda.current_stream(None)
        if not self.items and self._pool is None:
            raise FakeCudaError("replay of a graph that was never captured")
        stamp = stream.tick()
        with torch.no_grad():
            for item in self.items:
                kind = item[0]
                if kind == "op":
                    _, func, args, kwargs = item
                    func(*args, **kwargs)
                elif kind == "fn":
                    _, func, args, kwargs, arena = item
                    result = func(*args, **kwargs)
                    for a, r in zip(_flat(arena), _flat(result)):
                        a.copy_(r)
                else:  # "work": fake-device work recorded by FakeCuda.enqueue (e.g. a TensorRT engine)
                    item[1](stream, stamp)
        self.replays += 1


def _flat(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _flat(v)]
    return []


class _Recorder(TorchDispatchMode):
    """Records the capturing thread's aten ops into a graph instead of running them (see the module doc)."""

    def __init__(self, capture: _Capture) -> None:
        super().__init__()
        self.capture = capture
        self.items = capture.graph.items
        self._arena: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id of a capture-made tensor -> graph memory
        self.made: list[weakref.ref] = []  # tensors made inside the capture, to find the ones still alive after it

    def _to_graph(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            found = self._arena.get(id(x))
            if found is not None and found[0]() is x:
                return found[1]
        return x

    def _remember(self, made: torch.Tensor, graph_memory: torch.Tensor) -> None:
        self._arena[id(made)] = (weakref.ref(made), graph_memory)
        self.made.append(weakref.ref(made))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            raise FakeCudaError(f"{func} reads device values on the host inside a CUDA graph capture")
        if any(isinstance(a, torch.Generator) for a in [*args, *kwargs.values()]):
            # A graph replays the default CUDA generator's philox offsets; a generator of one's own (the
            # per-seed ones) would have to be registered with the graph, and a CPU one is host work.
            raise FakeCudaError(f"{func} draws from a generator of its own inside a CUDA graph capture (draw before)")
        gargs, gkwargs = tree_map(self._to_graph, args), tree_map(self._to_graph, kwargs)
        writes = [a for a in func._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
        if writes:  # in place / out=: recorded, run at replay only
            self.items.append(("op", func, gargs, gkwargs))
            return _mutated_result(func, args, kwargs)
        if func.is_view:
            out = func(*args, **kwargs)
            mapped = func(*gargs, **gkwargs)
            for o, m in zip(_flat(out), _flat(mapped)):
                if o is not m and m.untyped_storage().data_ptr() != o.untyped_storage().data_ptr():
                    self._remember(o, m)  # a view of graph memory
            return out
        out = func(*args, **kwargs)  # computed now for its shape; its values come from the replay
        arena = tree_map(
            lambda t: (
                torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
                if isinstance(t, torch.Tensor)
                else t
            ),
            out,
        )
        for o, a in zip(_flat(out), _flat(arena)):
            self._remember(o, a)
        self.items.append(("fn", func, gargs, gkwargs, arena))
        return out

    def live_bytes(self) -> int:
        storages = {}
        for ref in self.made:
            t = ref()
            if t is not None:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        return sum(storages.values())


def _mutated_result(func, args, kwargs) -> Any:
    """What an in-place or out= op returns: the arguments its schema says it writes and returns."""
    by_set: dict[str, Any] = {}
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            for s in arg.alias_info.before_set:
                by_set[s] = value
    results = []
    for ret in func._schema.returns:
        if ret.alias_info is None:
            raise NotImplementedError(f"fake capture of {func}: a mutating op with a fresh output")
        results.append(by_set[next(iter(ret.alias_info.before_set))])
    if not results:
        return None
    return results[0] if len(results) == 1 else tuple(results)


class FakeCuda:
    """A GPU for CPU tests with the interface of :class:`runtimes.cuda.Cuda` (see the module doc)."""

    def __init__(
        self, *, name: str = "NVIDIA H200 (fake)", capability: tuple[int, int] = (9, 0), memory: int = 140 << 30
    ) -> None:
        self.name, self.capability = name, capability
        self.free, self.total = memory, memory
        self.lock = threading.RLock()
        self.host_clock: dict[int, int] = {}
        self._handles = itertools.count(1)
        self.default = FakeStream(self, 0)
        self._streams: dict[int, FakeStream] = {0: self.default}
        self._local = threading.local()
        self._capture: _Capture | None = None
        self._pools = itertools.count(1)
        self._accesses: dict[Hashable, dict[int, tuple[dict[int, int], str]]] = {}
        self.captures = 0
        self.syncs = 0

    # ---------------------------------------------------------------- device
    def is_device(self, device: torch.device) -> bool:
        return device.type == "cpu"  # the fake GPU's memory is host memory

    def device_guard(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def require(self, device: torch.device, what: str) -> None:
        if not self.is_device(device):
            raise FakeCudaError(f"{what}: {device} is not the fake GPU (its memory is host memory: use cpu)")

    def set_device(self, device: torch.device) -> None:
        pass

    def properties(self, device: torch.device) -> tuple[str, int, int]:
        return self.name, *self.capability

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        return self.free, self.total

    # ---------------------------------------------------------------- streams
    def current_stream(self, device: torch.device | None) -> FakeStream:
        stack = getattr(self._local, "streams", None)
        return stack[-1] if stack else self.default

    def new_stream(self, device: torch.device | None) -> FakeStream:
        stream = FakeStream(self, next(self._handles))
        self._streams[stream.cuda_stream] = stream
        return stream

    def stream_of(self, handle: int) -> FakeStream:
        """The stream behind a raw handle (what TensorRT's execute_async_v3 receives)."""
        try:
            return self._streams[int(handle)]
        except KeyError:
            raise FakeCudaError(f"stream handle {handle} was not made by this fake GPU") from None

    @contextlib.contextmanager
    def use_stream(self, stream: FakeStream) -> Iterator[None]:
        stack = self._local.__dict__.setdefault("streams", [])
        stack.append(stream)
        try:
            yield
        finally:
            stack.pop()

    def refuse_host_wait(self, what: str) -> None:
        cap = self._capture
        if cap is not None and cap.thread == threading.get_ident():
            raise FakeCudaError(
                f"{what} inside a CUDA graph capture (operation not permitted when stream is capturing)"
            )
        self.syncs += 1

    def synchronize(self, device: torch.device | None = None) -> None:
        self.refuse_host_wait("device synchronize")
        with self.lock:
            for stream in self._streams.values():
                for k, v in stream.clock.items():
                    self.host_clock[k] = max(self.host_clock.get(k, 0), v)

    # ---------------------------------------------------------------- graphs
    def new_graph(self) -> FakeGraph:
        return FakeGraph(self)

    def new_pool(self, device: torch.device | None) -> FakePool:
        return FakePool(next(self._pools))

    @contextlib.contextmanager
    def capture(self, graph: FakeGraph, *, pool: FakePool | None = None, stream: FakeStream | None = None):
        stream = stream or getattr(self, "_torch_capture_stream", None)
        if stream is None:
            stream = self._torch_capture_stream = self.new_stream(None)  # torch.cuda.graph's own side stream
        if stream.cuda_stream == 0:
            raise FakeCudaError("CUDA graphs cannot be captured on the legacy default stream")
        if self._capture is None:
            self.synchronize()  # torch.cuda.graph synchronises the device before it begins
        with self.lock:
            if self._capture is not None:
                raise FakeCudaError(
                    "a second CUDA graph capture while another is underway "
                    "(PyTorch: only one capture may be underway at a time in the process)"
                )
            if graph.items:
                raise FakeCudaError("a CUDA graph captured twice")
            pool = pool or FakePool(next(self._pools))
            cap = self._capture = _Capture(graph, pool, stream, threading.get_ident())
        graph._pool = pool
        pool.captures.append(cap)
        stream.captured_by = cap
        recorder = cap.recorder = _Recorder(cap)
        ok = False
        try:
            with self.use_stream(stream), recorder:
                yield
            ok = True
        finally:
            with self.lock:
                self._capture = None
                for s in [stream, *cap.joined]:
                    s.captured_by = None
            self.captures += 1
        if ok and cap.unjoined:
            names = ", ".join(sorted(map(str, cap.unjoined)))
            raise FakeCudaError(
                f"capture ended with {names} not joined back into {stream} (cudaErrorStreamCaptureUnjoined)"
            )

    def capture_graph(self) -> FakeGraph | None:
        """The graph being captured on this thread, or None."""
        cap = self._capture
        return cap.graph if cap is not None and cap.thread == threading.get_ident() else None

    def capturing(self) -> bool:
        cap = self._capture
        return cap is not None and cap.thread == threading.get_ident()

    def pool_live_bytes(self, pool: FakePool) -> int:
        return sum(c.recorder.live_bytes() for c in pool.captures if c.recorder is not None)

    # ---------------------------------------------------------------- fake-device work (the fake TensorRT's)
    def enqueue(self, stream: FakeStream, work: Callable[[FakeStream, dict[int, int]], None], what: str) -> None:
        """Run ``work(stream, timestamp)`` as device work on ``stream``, or record it into the capture underway.

        Work on a stream that is not part of the capture, from the capturing thread, is refused: it would run now
        and be missing from the graph.
        """
        cap = self._capture
        if cap is not None and cap.thread == threading.get_ident():
            if stream.captured_by is not cap:
                raise FakeCudaError(
                    f"{what} enqueued on {stream}, which is not part of the CUDA graph capture underway on "
                    f"{cap.stream}: it would run now and be missing from the graph"
                )
            cap.graph.items.append(("work", work))
            if stream is not cap.stream:
                cap.unjoined.add(stream)
            return
        work(stream, stream.tick())

    def access(self, resource: Hashable, stream: FakeStream, stamp: dict[int, int], what: str) -> None:
        """Note a use of ``resource`` by work on ``stream`` at ``stamp``; refuse one that may overlap another use."""
        with self.lock:
            uses = self._accesses.setdefault(resource, {})
            for other, (when, other_what) in uses.items():
                if other != stream.cuda_stream and stamp.get(other, 0) < when[other]:
                    raise FakeCudaError(
                        f"{what} on {stream} may run at the same time as {other_what} on stream {other}: "
                        f"both use {resource} and neither stream waited for the other"
                    )
            uses[stream.cuda_stream] = (stamp, what)
