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
``built_with`` with what is here before anything is deserialized.  Each
deserialized plan's identity (its network name, :func:`export.manifest.plan_name`)
and inputs and outputs (names, dtypes, static dims) are then compared with its
manifest entry, so a plan in another engine's slot is refused before it runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from export.manifest import FileTensor, check_engine_io, check_plan_identity, entry_identity
from lego_model.errors import LegoError
from runtimes.backends.base import (
    BackendKind,
    BackendOptions,
    EngineBackend,
    EngineCall,
    check_file_precision,
    require_cuda,
)
from runtimes.errors import BackendError

if TYPE_CHECKING:
    from export.manifest import BuiltWith, EngineEntry, Manifest

log = logging.getLogger(__name__)


def import_tensorrt() -> Any:
    """The tensorrt module, or a BackendError that says how to get it."""
    try:
        import tensorrt
    except ImportError:
        raise BackendError(
            "tensorrt is not installed: pip install 'lego-deploy[gpu]' on a machine with an NVIDIA GPU, "
            "or use --backend onnxruntime-cuda / onnxruntime-cpu / torch"
        ) from None
    return tensorrt


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


# TensorRT DataType names of the engine I/O dtypes.
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def plan_io(trt: Any, engine: Any) -> tuple[list[FileTensor], list[FileTensor]]:
    """(inputs, outputs) a deserialized plan declares; dynamic dims are -1 (TensorRT >= 8.5 tensor API)."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = engine.get_tensor_dtype(name)
        kind = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        tensor = FileTensor(name, _TRT_DTYPES.get(kind, kind.lower()), shape)
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(tensor)
    return inputs, outputs


def _scratch_size(engine: Any) -> int:
    """Activation memory an engine needs at most (over its profile): the 64-bit query where it exists."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def _user_managed_context(trt: Any, engine: Any) -> Any:
    """An execution context whose scratch memory we supply (TensorRT 10 strategy argument, or a runtime config)."""
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    try:
        return engine.create_execution_context(strategy)
    except TypeError:  # versions that take an IRuntimeConfig instead
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(config)


def _attach_scratch(ctx: Any, scratch: Tensor) -> None:
    if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1: pointer and size
        ctx.set_device_memory(scratch.data_ptr(), scratch.numel())
    else:
        ctx.device_memory = scratch.data_ptr()


class TensorRTBackend(EngineBackend):
    """Runs the manifest's TensorRT plans; buffers are torch CUDA tensors."""

    name = "tensorrt"
    supports_cuda_graphs = True

    def __init__(self, manifest: Manifest, engine_dir: str | Path, *, device: torch.device) -> None:
        super().__init__(manifest, engine_dir, "tensorrt", device)
        self.engines: dict[str, Any] = {}
        self.contexts: dict[str, Any] = {}
        self._scratch: Tensor | None = None
        self._trt: Any = None
        self._runtime: Any = None
        self._lock = threading.Lock()  # an execution context is not thread-safe: shapes, addresses, enqueue

    def load(self) -> None:
        for warning in check_engines_here(self.entries, self.device):
            log.warning(warning)
        trt = self._trt = import_tensorrt()
        logger = trt.Logger(trt.Logger.WARNING)
        # The runtime must outlive the engines it deserializes, and the engines their contexts.
        runtime = self._runtime = trt.Runtime(logger)
        torch.cuda.set_device(self.device)
        for name, entry in self.entries.items():
            engine = runtime.deserialize_cuda_engine(entry.path(self.engine_dir).read_bytes())
            if engine is None:
                raise BackendError(
                    f"TensorRT cannot deserialize {entry.path(self.engine_dir)}; "
                    "rebuild with lego-export --engines trt --force"
                )
            # load_manifest cannot read a plan: its identity and I/O are checked here, before it runs.
            where = f"{entry.path(self.engine_dir)} (engine {name})"
            warning = check_plan_identity(where, getattr(engine, "name", None), entry_identity(entry, self.manifest))
            if warning:
                log.warning(warning)
            check_engine_io(where, entry.inputs, entry.outputs, *plan_io(trt, engine))
            self.engines[name] = engine
        shared = hasattr(trt, "ExecutionContextAllocationStrategy")
        if shared:
            # One scratch allocation for all contexts, sized for the largest engine over its whole profile.
            size = max(_scratch_size(e) for e in self.engines.values())
            self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        for name, engine in self.engines.items():
            if shared:
                ctx = _user_managed_context(trt, engine)
                if ctx is not None:
                    _attach_scratch(ctx, self._scratch)
            else:  # TensorRT < 10: every context owns its scratch memory
                ctx = engine.create_execution_context()
            if ctx is None:
                raise BackendError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
            self.contexts[name] = ctx
        log.info(
            "tensorrt %s: %d engines, shared scratch %s MiB",
            trt.__version__,
            len(self.engines),
            "n/a" if self._scratch is None else f"{self._scratch.numel() / 2**20:.1f}",
        )

    def close(self) -> None:
        self.contexts.clear()  # contexts, then engines, then the runtime and the scratch they used
        self.engines.clear()
        self._runtime = None
        self._scratch = None

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        self.require_loaded()
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
    uses=frozenset({"precision"}),
    chosen="TensorRT engines match this GPU and TensorRT",
)
