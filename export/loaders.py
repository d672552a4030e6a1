"""Engine files to runnable objects: one loader per format, for the runtimes' backends, VAE decoding and verification.

The file-reading side of the manifest.  :func:`export.manifest.load_manifest`
says which files an engine directory holds and that they are intact; the
functions here turn one of them into what runs it:

* ONNX: :func:`session_from_onnx` builds an ONNX Runtime ``InferenceSession``
  from a path or serialized bytes with :class:`SessionSettings` (execution
  provider, threads, graph optimization, memory arena, spinning);
* TensorRT: :func:`engine_from_entry` deserializes a plan and checks its
  identity and I/O against its manifest entry, :func:`context_from_engine`
  gives it an execution context, on scratch memory of the caller's
  (:func:`shared_scratch`, one allocation for every context) or its own.

onnxruntime and tensorrt are imported inside the functions that need them
(:func:`import_onnxruntime`, :func:`import_tensorrt`), each with the one line
that says how to install it.  The TensorRT calls are the TensorRT 10/11
Python API (tensor names, ``ExecutionContextAllocationStrategy``); the
``gpu`` extra requires tensorrt >= 10.  Every refusal is one
:class:`export.errors.BackendError` line that says what to do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from export.errors import BackendError
from export.identity import check_engine_io, check_plan_identity, entry_identity
from export.records import FileTensor

if TYPE_CHECKING:
    from export.records import EngineEntry, Manifest
    from lego_model.configs import LegoConfig

log = logging.getLogger(__name__)

__all__ = [
    "OPTIMIZATIONS",
    "SessionSettings",
    "attach_scratch",
    "check_plan",
    "context_from_engine",
    "engine_from_entry",
    "engine_from_plan",
    "execution_providers",
    "fused_onnx",
    "import_onnxruntime",
    "import_tensorrt",
    "plan_io",
    "plan_runtime",
    "scratch_size",
    "session_from_onnx",
    "session_options",
    "shared_scratch",
    "user_managed_context",
]

# ------------------------------------------------------------------------------------------ ONNX Runtime

# Graph optimization names -> ONNX Runtime's GraphOptimizationLevel members.  "fusions" is ORT_ENABLE_ALL after
# the onnxruntime.transformers optimizer's fusions (:func:`fused_onnx`).
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
    "fusions": "ORT_ENABLE_ALL",
}
OPTIMIZATIONS = tuple(_LEVELS)


def import_onnxruntime() -> Any:
    """The onnxruntime module, or a BackendError that says which package to install."""
    try:
        import onnxruntime
    except ImportError:
        raise BackendError(
            "onnxruntime is not installed: pip install 'lego-deploy[cpu]' (or [gpu] for onnxruntime-gpu)"
        ) from None
    return onnxruntime


@dataclass(frozen=True)
class SessionSettings:
    """How an ONNX Runtime session is built: where it runs, and how it uses the CPU and memory.

    ``optimization`` is one of :data:`OPTIMIZATIONS`: ``"all"`` is ONNX
    Runtime's ``ORT_ENABLE_ALL`` (constant folding, LayerNorm/GELU/MatMul+Add
    fusions, NCHWc layouts on CPU); ``"fusions"`` first runs the
    onnxruntime.transformers optimizer in memory (:func:`fused_onnx`).
    ``arena=False`` leaves allocation to the system allocator instead of ONNX
    Runtime's CPU arena (which keeps what the largest request allocated).
    ``spin`` lets idle intra-op threads spin: lower wake-up latency between
    small ops, but on cores shared with other processes they burn the time
    slices the work needs (lego_S_PG_64, 2 threads on a loaded 2-core machine:
    472 ms per call without spinning, 788 ms with it; benchmarks/test_runtime.py).
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # "cuda[:N]": the CUDA EP on GPU N
    stream: int | None = None  # CUDA stream handle the CUDA provider launches on (None: a stream of ORT's own)
    threads: int | None = None  # intra-op threads (None: ONNX Runtime's default, one per physical core)
    optimization: str = "all"
    arena: bool = True
    spin: bool = False
    # Write ONNX Runtime's profile (chrome-trace JSON, one event per kernel run) to files with this path prefix;
    # InferenceSession.end_profiling() names the file (benchmarks/profiling.py reads it).
    profile_prefix: str | None = None


def execution_providers(ort: Any, settings: SessionSettings) -> list[Any]:
    """The ``providers`` of an InferenceSession on ``settings.device``; refuses CUDA where ORT has no CUDA EP."""
    if settings.device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError(
            "this onnxruntime has no CUDAExecutionProvider: pip install onnxruntime-gpu, "
            "or use --backend onnxruntime-cpu"
        )
    options: dict[str, Any] = {"device_id": settings.device.index or 0}
    if settings.stream is not None:
        # ORT ignores handle 0 (torch's legacy default stream): the caller passes a stream of its own.
        options["user_compute_stream"] = str(settings.stream)
    return [("CUDAExecutionProvider", options)]


def session_options(ort: Any, settings: SessionSettings) -> Any:
    """``onnxruntime.SessionOptions`` of ``settings``: optimization level, threads, arena, spinning; errors-only log."""
    if settings.optimization not in _LEVELS:
        raise BackendError(
            f"unknown ONNX Runtime optimization {settings.optimization!r}; choose one of {list(OPTIMIZATIONS)}"
        )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[settings.optimization])
    if settings.threads is not None:
        opts.intra_op_num_threads = settings.threads
    opts.inter_op_num_threads = 1  # the graph runs sequentially: inter-op threads would only idle
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only
    opts.enable_cpu_mem_arena = settings.arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin else "0")
    if settings.profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = settings.profile_prefix
    return opts


def fused_onnx(path: str | Path, config: LegoConfig) -> bytes:
    """The ONNX file at ``path`` after the onnxruntime.transformers optimizer's fusions, serialized (nothing written).

    It fuses a decomposed tanh-GELU (files of opset < 20) into FastGelu and
    the LayerNorms; it finds no attention pattern, since attention inside
    tiles is not BERT-shaped.  Every
    brick of lego_S_PG_64 stays within 2e-6 of the unoptimized graph; it costs
    seconds of load time per brick for a few percent per call.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    # Its BiasGelu fusion turns Add + any "Gelu" node into the erf GELU, reading ONNX's opset-20
    # Gelu(approximate="tanh") as com.microsoft's erf Gelu (onnxruntime 1.32): a different function.
    options.enable_bias_gelu = False
    # Its SkipLayerNorm fusion indexes a LayerNormalization's bias input, which the bricks' affine-free norms
    # (exported by torch's dynamo exporter with the scale only) do not have: IndexError (onnxruntime 1.32).
    options.enable_skip_layer_norm = False
    options.enable_bias_skip_layer_norm = False
    fused = optimize_model(str(path), model_type="bert", num_heads=config.num_heads, hidden_size=config.hidden_size,
                           opt_level=0, optimization_options=options)  # fmt: skip
    log.info("%s: transformers optimizer fusions %s", Path(path).name,
             {k: v for k, v in fused.get_fused_operator_statistics().items() if v})  # fmt: skip
    return fused.model.SerializeToString()


def session_from_onnx(
    model: str | Path | bytes,
    settings: SessionSettings | None = None,
    *,
    name: str | None = None,
    config: LegoConfig | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` of an ONNX file (its path, or its serialized bytes) built with ``settings``.

    ``settings`` default: :class:`SessionSettings` (the CPU, ONNX Runtime's
    threads, all optimizations).  ``name`` is what a refusal calls the file (default: the path; required
    for bytes).  ``config`` is the LEGO model the file belongs to: the
    ``"fusions"`` optimization needs its attention sizes.  A file ONNX Runtime
    cannot load (a damaged file, an opset or kernel this build lacks) is one
    BackendError line.  ``InferenceSession.run`` is thread-safe; an
    ``IOBinding`` made from the session is not.
    """
    ort = import_onnxruntime()
    settings = settings or SessionSettings()
    if name is None:
        assert not isinstance(model, bytes), "name the file a session is built from bytes of"
        name = str(model)
    opts = session_options(ort, settings)
    providers = execution_providers(ort, settings)
    try:
        if settings.optimization == "fusions":
            assert config is not None and not isinstance(model, bytes), "fusions optimize a file of a known model"
            model = fused_onnx(model, config)
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts, providers=providers)
    except Exception as err:  # ORT raises its own exception types (Fail, InvalidGraph, NotImplemented, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(f"onnxruntime cannot load {name} ({reason}); re-export with lego-export --force") from None


# ---------------------------------------------------------------------------------------------- TensorRT


def onnx_weights(path: str | Path) -> list[tuple[str, Any]]:
    """(name, numpy array) of every initializer of an ONNX file: the weights an engine computes with (read for a
    NaN/Inf report, lego_model.eager.nonfinite_cause)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return [(t.name, numpy_helper.to_array(t)) for t in model.graph.initializer]


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


def plan_runtime() -> Any:
    """A ``tensorrt.Runtime`` that logs warnings and errors; it must outlive the engines it deserializes."""
    trt = import_tensorrt()
    return trt.Runtime(trt.Logger(trt.Logger.WARNING))


def engine_from_plan(runtime: Any, plan: bytes, where: str) -> Any:
    """The ``ICudaEngine`` of a serialized plan; ``where`` names the plan when TensorRT cannot deserialize it."""
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendError(f"TensorRT cannot deserialize {where}; rebuild with lego-export --engines trt --force")
    return engine


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


def check_plan(engine: Any, entry: EngineEntry, manifest: Manifest, where: str) -> None:
    """Refuse a deserialized plan that is not ``entry``'s engine: its identity (network name) and declared I/O.

    :func:`export.manifest.load_manifest` cannot read a plan, so this runs
    when it is deserialized, before it runs.  A plan without an identity
    (built by an older lego-export) is checked by its I/O alone, with a warning.
    """
    warning = check_plan_identity(where, getattr(engine, "name", None), entry_identity(entry, manifest))
    if warning:
        log.warning(warning)
    check_engine_io(where, entry.inputs, entry.outputs, *plan_io(import_tensorrt(), engine))


def engine_from_entry(runtime: Any, entry: EngineEntry, manifest: Manifest, engine_dir: str | Path) -> Any:
    """The ``ICudaEngine`` of a manifest's TensorRT entry: its plan read, deserialized and :func:`check_plan`-ed."""
    path = entry.path(engine_dir)
    engine = engine_from_plan(runtime, path.read_bytes(), str(path))
    check_plan(engine, entry, manifest, f"{path} (engine {entry.name})")
    return engine


def scratch_size(engine: Any) -> int:
    """Activation memory an engine needs at most (over its profile): the 64-bit query where it exists."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(engine.device_memory_size if size is None else size)


def shared_scratch(engines: Iterable[Any], device: torch.device) -> Tensor:
    """One scratch allocation for contexts that run one at a time: bytes for the largest engine over its profile.

    Allocated once and never resized, so CUDA graphs captured on contexts
    that use it stay valid when shapes change.
    """
    size = max((scratch_size(e) for e in engines), default=0)
    return torch.empty(max(size, 1), dtype=torch.uint8, device=device)


def user_managed_context(engine: Any) -> Any:
    """An execution context whose scratch memory the caller supplies (:func:`attach_scratch`); None when TensorRT fails.

    TensorRT 10 takes the allocation strategy as an argument; versions that
    take an ``IRuntimeConfig`` instead get one carrying the strategy.
    """
    trt = import_tensorrt()
    strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
    try:
        return engine.create_execution_context(strategy)
    except TypeError:
        config = engine.create_runtime_config()
        config.set_execution_context_allocation_strategy(strategy)
        return engine.create_execution_context(config)


def attach_scratch(context: Any, scratch: Tensor) -> None:
    """Point a user-managed context at ``scratch`` (device memory at least :func:`scratch_size` of its engine)."""
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1: pointer and size
        context.set_device_memory(scratch.data_ptr(), scratch.numel())
    else:
        context.device_memory = scratch.data_ptr()


def context_from_engine(engine: Any, name: str, scratch: Tensor | None = None) -> Any:
    """An execution context of ``engine`` (engine ``name`` in refusals): on ``scratch``, or owning its own memory.

    With ``scratch`` the context is user-managed (:func:`user_managed_context`,
    :func:`attach_scratch`), so contexts that never run at the same time share
    one allocation; without, TensorRT allocates the context's memory itself.
    A context is not thread-safe: its shapes, addresses and enqueues belong to one caller at a time.
    """
    if scratch is None:
        context = engine.create_execution_context()
    else:
        context = user_managed_context(engine)
        if context is not None:
            attach_scratch(context, scratch)
    if context is None:
        raise BackendError(f"TensorRT could not create an execution context for {name} (out of GPU memory?)")
    return context
