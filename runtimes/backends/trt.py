"""TensorRT backend: each engine deserialized once, one execution context per engine, torch CUDA buffers.

Per shape every context gets ``set_input_shape``; per call the chain's buffers
are bound with ``set_tensor_address`` and the engine is enqueued with
``execute_async_v3`` on torch's current stream, so that the EDM arithmetic,
the engines and a CUDA graph capture all share one stream.  The bricks run
one after another, so their activation (scratch) memory is one torch
allocation shared by every context (``USER_MANAGED`` allocation strategy),
sized for the largest engine over its whole profile: it is never reallocated,
which keeps captured CUDA graphs valid when the shape changes.

An engine only runs on the GPU architecture and TensorRT version it was
built with; :func:`check_engine_compat` compares the manifest's
``built_with`` with what is here before anything is deserialized.  The plans
are read by :mod:`export.loaders`: each deserialized plan's identity (its
network name, :func:`export.identity.plan_name`) and inputs and outputs
(names, dtypes, static dims) are compared with its manifest entry
(:func:`export.loaders.engine_from_entry`), so a plan in another engine's slot
is refused before it runs; its context is user-managed on the shared scratch
(:func:`export.loaders.context_from_engine`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
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
    EngineBackend,
    EngineCall,
    check_file_precision,
    require_cuda,
)
from runtimes.errors import BackendError

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


def check_engines_here(entries: Mapping[str, EngineEntry], device: torch.device) -> list[str]:
    """Check every TensorRT engine against the TensorRT and the GPU of this process; returns warnings."""
    trt = import_tensorrt()
    require_cuda("the TensorRT backend", device.index or 0)
    props = torch.cuda.get_device_properties(device)
    cap = f"{props.major}.{props.minor}"
    warnings: list[str] = []
    for name, entry in entries.items():
        warnings += check_engine_compat(name, entry.built_with, trt.__version__, props.name, cap)
    return warnings


class TensorRTBackend(EngineBackend):
    """Runs the manifest's TensorRT plans; buffers are torch CUDA tensors."""

    name = "tensorrt"
    supports_cuda_graphs = True

    def __init__(self, manifest: Manifest, engine_dir: str | Path, *, device: torch.device) -> None:
        super().__init__(manifest, engine_dir, "tensorrt", device)
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self._scratch: Tensor | None = None
        self._runtime: Any = None
        self._lock = threading.Lock()  # an execution context is not thread-safe: shapes, addresses, enqueue

    def load(self) -> None:
        for warning in check_engines_here(self.entries, self.device):
            log.warning(warning)
        trt = import_tensorrt()
        # The runtime must outlive the engines it deserializes, and the engines their contexts.
        runtime = self._runtime = plan_runtime()
        torch.cuda.set_device(self.device)
        for name, entry in self.engines_to_load().items():
            self.engines[name] = engine_from_entry(runtime, entry, self.manifest, self.engine_dir)
        # The bricks run one after another: one scratch allocation serves every context.
        self._scratch = shared_scratch(self.engines.values(), self.device)
        for name, engine in self.engines.items():
            self.contexts[name] = context_from_engine(engine, name, self._scratch)
        log.info(
            "tensorrt %s: %d engines, shared scratch %.1f MiB",
            trt.__version__,
            len(self.engines),
            self._scratch.numel() / 2**20,
        )
        self._load_vae()

    def close(self) -> None:
        self.contexts.clear()  # contexts, then engines, then the runtime and the scratch they used
        self.engines.clear()
        self._runtime = None
        self._scratch = None

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        self.require_loaded()
        if self.decodes_eagerly(call):
            return self._eager_decode(inputs, outputs)
        with self._lock:
            self._enqueue(call, inputs, outputs)

    def _enqueue(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        ctx = self.contexts[call.engine]
        # The context's input shapes and addresses follow the tensors handed now (whoever handed them):
        # both are host-side settings, cheap to repeat, so nothing is cached that another caller could stale.
        for name, t in inputs.items():
            dims = tuple(t.shape)
            if tuple(ctx.get_tensor_shape(name)) != dims and not ctx.set_input_shape(name, dims):
                raise BackendError(f"TensorRT refused shape {dims} for {call.engine}.{name}; check the engine profile")
        for tensors in (inputs, outputs):
            for name, t in tensors.items():
                ctx.set_tensor_address(name, t.data_ptr())
        # Torch's current stream: the capture stream while a CUDA graph is being recorded.
        if not ctx.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise BackendError(f"TensorRT failed to enqueue {call.engine}; run with a TensorRT log level of VERBOSE")


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
