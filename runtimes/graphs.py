"""CUDA graphs of one denoiser call, captured per (batch, H, W, active set, guidance) and replayed.

A graph records kernels with fixed pointers and shapes, so anything that
changes a pointer, a shape or a baked-in scalar selects another graph: the
key holds the batch, the image size, the active brick set (a skipped brick is
absent from the recorded call) and whether guidance doubles the rows.  Values
that change between runs (x, sigma, the guidance scale) are not in the key:
they live in the chain's per-shape buffers, which the graph reads at every
replay (gpt-fast's static inputs) and which outlive the graphs.

The first call of a key runs eagerly on a side stream (cuBLAS handles,
TensorRT's deferred allocations and autotuning happen there, outside the
capture) and its result is the result of that call; the capture that follows
records without executing.  All graphs share one memory pool: their
temporaries die inside each capture, and replays never overlap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from runtimes.cuda import TORCH_CUDA, Cuda

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


class CudaGraphCache:
    """Captured graphs by :class:`GraphKey`; ``run(key, step)`` replays or warms up and captures."""

    def __init__(self, device: torch.device, cuda: Cuda = TORCH_CUDA) -> None:
        self.device = device
        self.cuda = cuda
        self._graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: GraphKey) -> bool:
        return key in self._graphs

    def discard(self, which: Callable[[GraphKey], bool]) -> int:
        """Drop the graphs whose key ``which`` accepts (their buffers are going away); returns how many."""
        gone = [k for k in self._graphs if which(k)]
        for k in gone:
            del self._graphs[k]
        return len(gone)

    def run(self, key: GraphKey, step: Callable[[], None]) -> None:
        """Replay the graph of ``key``; on its first use run ``step`` eagerly (the real call), then capture it."""
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            self.replays += 1
            return
        with self.cuda.device_guard(self.device):
            self._capture(key, step)

    def _capture(self, key: GraphKey, step: Callable[[], None]) -> None:
        cuda = self.cuda
        current = cuda.current_stream(self.device)
        side = cuda.new_stream(self.device)
        side.wait_stream(current)
        with cuda.use_stream(side):
            step()  # warm-up; its outputs are this call's result
        current.wait_stream(side)
        graph = cuda.new_graph()
        with cuda.capture(graph, pool=self._pool):
            step()
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = graph
        self.captures += 1
        log.debug("captured CUDA graph %s (%d cached)", key, len(self._graphs))
