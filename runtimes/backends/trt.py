"""TensorRT backend: each engine deserialized once, one execution context per binding, torch CUDA buffers.

A context is set up once -- input shapes and the addresses of the tensors it
is handed -- and never changed afterwards: contexts are kept by the buffers
they point at (:func:`runtimes.backends.base.buffers_key`), so another batch,
size, chain, or skip pattern (brick 1 reads zeros under plan (1, 2) but brick
0's output under (0, 1, 2)) gets a context of its own.  That is TensorRT's rule
for CUDA graphs -- one execution context per captured graph, untouched after
the capture -- kept by construction, for per-call graphs and whole-loop graphs
alike (a whole run enqueues one engine with several bindings); a context a
graph captured is kept alive with that graph (:func:`runtimes.graphs.hold_for_graph`),
and found again, even once this backend's bounded cache has dropped it.

The bricks run one after another, so their activation (scratch) memory is one
torch allocation shared by every context (``USER_MANAGED`` allocation
strategy), sized for the largest engine over its whole profile: it is never
reallocated, which keeps captured graphs valid.  Contexts on one scratch must
never run at the same time, so every enqueue -- and every graph replay -- goes
through the device's :class:`runtimes.graphs.DeviceLane`: one lock and one
non-default stream per device, ordered with the caller's current stream by
events.  Thread-safe: any number of chains and threads may share the backend;
their engine work is serialised on the device, not parallel.

An engine only runs on the GPU architecture and TensorRT version it was
built with; :func:`check_engine_compat` compares the manifest's
``built_with`` with what is here before anything is deserialized.  The plans
are read by :mod:`export.loaders`: each deserialized plan's identity (its
network name, :func:`export.identity.plan_name`) and inputs and outputs
(names, dtypes, static dims) are compared with its manifest entry
(:func:`export.loaders.engine_from_entry`), so a plan in another engine's slot
is refused before it runs; its contexts are user-managed on the shared scratch
(:func:`export.loaders.context_from_engine`).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from export.loaders import context_from_engine, engine_from_entry, import_tensorrt, plan_runtime, shared_scratch
from lego_model.errors import LegoError
from runtimes.backends.base import (
    DECODER_OPTIONS,
    BackendKind,
    BackendOptions,
    BindingCache,
    EngineBackend,
    EngineCall,
    buffers_key,
    check_file_precision,
)
from runtimes.cuda import TORCH_CUDA, Cuda
from runtimes.errors import BackendError
from runtimes.graphs import DeviceLane, hold_for_graph

if TYPE_CHECKING:
    from export.records import BuiltWith, EngineEntry, Manifest

log = logging.getLogger(__name__)


def check_engine_compat(
    engine: str, built_with: BuiltWith, trt_version: str, gpu_name: str, capability: str
) -> list[str]:
    """Refuse an engine built for another TensorRT version or GPU architecture; returns warnings.

    TensorRT plans are tied to the exact TensorRT version and to the compute
    capability they were tuned for (unless built version-/hardware-compatible,
    which lego-export does not do).  A different GPU model of the same
    capability loads, but its tactics were timed elsewhere: that is a warning.
    ``capability`` is "major.minor", as the exporter records it.
    """
    fix = "rebuild the engines here with lego-export --engines trt --force"
    if built_with.tensorrt != trt_version:
        raise BackendError(
            f"engine {engine} was built with TensorRT {built_with.tensorrt}, this machine has TensorRT {trt_version}; "
            f"{fix}"
        )
    if built_with.compute_capability != capability:
        raise BackendError(
            f"engine {engine} was built for compute capability {built_with.compute_capability} ({built_with.gpu}), "
            f"this GPU ({gpu_name}) is {capability}; {fix}"
        )
    if built_with.gpu != gpu_name:
        return [
            f"engine {engine} was built on {built_with.gpu}, running on {gpu_name} (same architecture): "
            "speed may differ"
        ]
    return []


def check_engines_here(entries: Mapping[str, EngineEntry], device: torch.device, cuda: Cuda = TORCH_CUDA) -> list[str]:
    """Check every TensorRT engine against the TensorRT and the GPU of this process; returns warnings."""
    trt = import_tensorrt()
    cuda.require(device, "the TensorRT backend")
    gpu, major, minor = cuda.properties(device)
    warnings: list[str] = []
    for name, entry in entries.items():
        warnings += check_engine_compat(name, entry.built_with, trt.__version__, gpu, f"{major}.{minor}")
    return warnings


class TensorRTBackend(EngineBackend):
    """Runs the manifest's TensorRT plans; buffers are torch CUDA tensors (see the module doc)."""

    name = "tensorrt"
    supports_cuda_graphs = True

    def __init__(
        self,
        manifest: Manifest,
        engine_dir: str | Path,
        *,
        device: torch.device,
        cuda: Cuda | None = None,
        max_contexts: int = 256,
    ) -> None:
        super().__init__(manifest, engine_dir, "tensorrt", device)
        if cuda is not None:
            self.cuda = cuda
        self.engines: dict[str, Any] = {}
        # Execution contexts by the buffers they are bound to, each set up once (bounded, least recently used out).
        self.contexts = BindingCache(max_contexts)
        self._alive: weakref.WeakValueDictionary[Hashable, _Bound] = weakref.WeakValueDictionary()  # also held
        self._scratch: Tensor | None = None
        self._runtime: Any = None
        self._lane: DeviceLane | None = None

    def load(self) -> None:
        for warning in check_engines_here(self.entries, self.device, self.cuda):
            log.warning(warning)
        trt = import_tensorrt()
        # The runtime must outlive the engines it deserializes, and the engines their contexts.
        runtime = self._runtime = plan_runtime()
        self.cuda.set_device(self.device)
        for name, entry in self.engines_to_load().items():
            self.engines[name] = engine_from_entry(runtime, entry, self.manifest, self.engine_dir)
        # The bricks run one after another (on the lane's one stream): one scratch allocation serves every context.
        self._scratch = shared_scratch(self.engines.values(), self.device)
        self._lane = DeviceLane.of(self.device, self.cuda)
        log.info(
            "tensorrt %s: %d engines, shared scratch %.1f MiB",
            trt.__version__,
            len(self.engines),
            self._scratch.numel() / 2**20,
        )
        self._load_vae()

    def close(self) -> None:
        self.contexts.clear()  # contexts, then engines, then the runtime and the scratch they used
        self._alive.clear()
        self.engines.clear()
        self._runtime = None
        self._scratch = None

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        self.require_loaded()
        if self.decodes_eagerly(call):
            return self._eager_decode(inputs, outputs)
        with self._lane.enter() as stream:
            bound = self._context(call, inputs, outputs)
            hold_for_graph(bound)  # a graph being captured replays this context: it lives as long as the graph
            ctx = bound.context
            # The lane's stream (the capture stream while a graph is recorded): never the legacy default stream.
            if not ctx.execute_async_v3(stream.cuda_stream):
                raise BackendError(
                    f"TensorRT failed to enqueue {call.engine}; run with a TensorRT log level of VERBOSE"
                )

    def _context(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> _Bound:
        """The context bound to exactly these tensors: made and set up on first use, never changed after.

        One the cache dropped but a graph still holds is found again (so the graph's warm-up and capture
        use one context, and no context is made twice while one lives).
        """
        key = buffers_key(call.engine, inputs, outputs)

        def make() -> _Bound:
            alive = self._alive.get(key)
            if alive is not None:
                return alive
            if self.cuda.capturing():
                # TensorRT's first enqueue after setup must not be captured; the graph cache's warm-up call
                # made every context a capture uses, so reaching here is a bug of the caller's warm-up.
                raise BackendError(f"a TensorRT context for {call.engine} was first needed inside a CUDA graph capture")
            ctx = context_from_engine(self.engines[call.engine], call.engine, self._scratch)
            for name, t in inputs.items():
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise BackendError(
                        f"TensorRT refused shape {tuple(t.shape)} for {call.engine}.{name}; check the engine profile"
                    )
            for tensors in (inputs, outputs):
                for name, t in tensors.items():
                    ctx.set_tensor_address(name, t.data_ptr())
            bound = self._alive[key] = _Bound(ctx)
            return bound

        return self.contexts.get(key, make)


class _Bound:
    """An execution context set up for one binding; a Python object, so that it can be referenced weakly."""

    __slots__ = ("__weakref__", "context")

    def __init__(self, context: Any) -> None:
        self.context = context


# ---------------------------------------------------------------------------- registry entry


def _problem(manifest: Manifest, opts: BackendOptions) -> str | None:
    """Why the manifest's TensorRT engines cannot run in this process, or None."""
    if "tensorrt" not in manifest.formats():
        return "no TensorRT engines"
    try:
        check_engines_here(manifest.engines_for("tensorrt"), torch.device("cuda", opts.local_rank))
    except LegoError as err:
        return str(err)
    return None


def _build(manifest: Manifest | None, engine_dir: Path | None, opts: BackendOptions) -> TensorRTBackend:
    assert manifest is not None and engine_dir is not None
    check_file_precision("tensorrt", opts.precision, manifest.engines_for("tensorrt"))
    return TensorRTBackend(manifest, engine_dir, device=torch.device("cuda", opts.local_rank))


KIND = BackendKind(
    name="tensorrt",
    format="tensorrt",
    problem=_problem,
    build=_build,
    uses=frozenset({"precision"}) | DECODER_OPTIONS,
    chosen="TensorRT engines match this GPU and TensorRT",
)
