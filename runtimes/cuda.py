"""The CUDA calls of the runtime -- streams, graphs, memory, device properties -- in one place.

Backends carry a :class:`Cuda` (``backend.cuda``), and the brick chain, its
CUDA graphs and the TensorRT backend reach the GPU only through it, so that
the tests can hand them a fake (``tests/fakes/cuda.py``) that keeps CUDA's
and PyTorch's rules on the CPU and raises where one is broken.  The methods
are thin: each is the torch.cuda call it names.  Streams are
``torch.cuda.Stream`` objects (``wait_stream``, ``synchronize``,
``cuda_stream``); a fake hands out objects with the same methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from runtimes.errors import BackendError


class Cuda:
    """torch.cuda, as the runtime uses it."""

    def is_device(self, device: torch.device) -> bool:
        """Whether ``device`` is a GPU this object drives (tensors there can be captured into graphs)."""
        return device.type == "cuda"

    def device_guard(self, device: torch.device) -> contextlib.AbstractContextManager[Any]:
        """Make ``device`` the current device inside the block."""
        return torch.cuda.device(device)

    def require(self, device: torch.device, what: str) -> None:
        """Refuse (BackendError) where ``device`` is not a GPU this process can use; ``what`` needs it."""
        require_cuda(what, device.index or 0)

    def set_device(self, device: torch.device) -> None:
        torch.cuda.set_device(device)

    def properties(self, device: torch.device) -> tuple[str, int, int]:
        """(name, major, minor) of the GPU: its model and compute capability."""
        props = torch.cuda.get_device_properties(device)
        return props.name, props.major, props.minor

    def mem_get_info(self, device: torch.device) -> tuple[int, int]:
        """(free, total) bytes of device memory, as the driver reports them (cudaMemGetInfo)."""
        return torch.cuda.mem_get_info(device)

    # ---------------------------------------------------------------- streams
    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        """A new non-default stream (never the legacy default stream, handle 0)."""
        return torch.cuda.Stream(device)

    def use_stream(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager[Any]:
        """Make ``stream`` the current stream inside the block (torch ops and our enqueues go there)."""
        return torch.cuda.stream(stream)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.synchronize(device)

    # ---------------------------------------------------------------- graphs
    def new_graph(self) -> torch.cuda.CUDAGraph:
        return torch.cuda.CUDAGraph()

    def new_pool(self, device: torch.device) -> Any:
        """A memory pool handle that captures can share (torch.cuda.graph_pool_handle)."""
        with torch.cuda.device(device):
            return torch.cuda.graph_pool_handle()

    @contextlib.contextmanager
    def capture(
        self, graph: torch.cuda.CUDAGraph, *, pool: Any = None, stream: torch.cuda.Stream | None = None
    ) -> Iterator[None]:
        """Record the CUDA work of the block into ``graph`` on ``stream``, temporaries from ``pool``.

        ``stream`` None: torch's own capture stream; ``pool`` None: a private pool of this graph.

        ``thread_local``: TensorRT may query its own state during enqueue, which the default "global"
        mode forbids; captures are serialised by the caller (PyTorch allows one at a time per process).
        """
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            yield

    def capturing(self) -> bool:
        """Whether the current stream is being captured."""
        return torch.cuda.is_current_stream_capturing()

    def pool_live_bytes(self, pool: Any) -> int:
        """Bytes of tensors allocated from ``pool`` that are still alive (its segments' active blocks)."""
        # Filtered here by the pool id each segment records, as torch's own cudagraph trees do.
        segments = torch.cuda.memory_snapshot(include_traces=False)
        return sum(int(s["active_size"]) for s in segments if tuple(s.get("segment_pool_id", ())) == tuple(pool))


#: The one instance backends use unless given another.
TORCH_CUDA = Cuda()


@contextlib.contextmanager
def stream_section(cuda: Cuda, stream: Any, device: torch.device) -> Iterator[Any]:
    """Run the block's CUDA work on ``stream``: after the current stream's work so far, before its later work.

    Events both ways (``wait_stream``), no host wait -- how a backend that owns
    a stream orders it with its caller's (TensorRT's enqueueV3 documentation
    advises against the legacy default stream, which torch's current stream
    usually is).  Nothing happens when ``stream`` already is the current one.
    """
    caller = cuda.current_stream(device)
    if caller.cuda_stream == stream.cuda_stream:
        yield stream
        return
    stream.wait_stream(caller)
    try:
        with cuda.use_stream(stream):
            yield stream
    finally:
        caller.wait_stream(stream)


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
