"""ONNX Runtime backend: one InferenceSession per engine, I/O bound to the chain's torch buffers.

The buffers are torch tensors (CPU, or CUDA for the CUDA execution provider);
each set of buffers an engine is handed gets one ``IOBinding`` that points
ONNX Runtime at their memory, created on first use and reused whenever the
same buffers (data pointers, shapes, dtypes) come again, so a denoiser call
copies nothing in or out of the sessions.  The bindings live in a bounded
cache keyed by those buffers (:class:`runtimes.backends.base.BindingCache`):
any number of chains may share one backend, and new buffers always rebind.

The sessions are built by :func:`export.loaders.session_from_onnx` with this
backend's :class:`export.loaders.SessionSettings` (which documents each one).
Memory: ONNX Runtime's CPU arena (``arena=True``, its default) keeps what the
largest request allocated for the session's lifetime; ``arena=False`` leaves
allocation to the system allocator.  ``python -m benchmarks.soak`` measures
resident memory along 200 mixed requests with either.

Graph optimizations (``optimization``): ``"all"`` (default) is ONNX Runtime's
``ORT_ENABLE_ALL``; ``"fusions"`` first runs the onnxruntime.transformers
optimizer in memory (:func:`export.loaders.fused_onnx`).  Both keep every brick
within 2e-6 of the unoptimized graph on lego_S_PG_64; the parity tests run the
default.  ``"fusions"`` costs seconds of load time per brick for a few percent
per call (benchmarks/test_runtime.py, table "ort settings"), so it is opt-in.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from export.loaders import SessionSettings, import_onnxruntime, session_from_onnx
from runtimes.backends.base import (
    DECODER_OPTIONS,
    BackendKind,
    BackendOptions,
    BindingCache,
    EngineBackend,
    EngineCall,
    buffers_key,
    check_file_precision,
    check_threads,
    default_threads,
)
from runtimes.backends.precision import INT8
from runtimes.errors import BackendError, UsageError

if TYPE_CHECKING:
    from export.records import Manifest

log = logging.getLogger(__name__)

_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


def cuda_provider_available() -> bool:
    """Whether ONNX Runtime here has the CUDA execution provider and torch sees a GPU."""
    try:
        ort = import_onnxruntime()
    except BackendError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


class OnnxRuntimeBackend(EngineBackend):
    """Runs the manifest's ONNX files with the CPU or the CUDA execution provider."""

    def __init__(
        self,
        manifest: Manifest,
        engine_dir: str | Path,
        *,
        device: torch.device,
        threads: int | None = None,
        optimization: str = "all",
        spin: bool = False,
        arena: bool = True,
        max_bindings: int = 256,
    ) -> None:
        super().__init__(manifest, engine_dir, "onnx", device)
        self.threads = threads or default_threads()
        self.optimization = optimization
        self.spin = spin
        self.arena = arena
        for name, dtype in vars(self.dtypes).items():
            if dtype not in _NUMPY:
                raise BackendError(f"ONNX Runtime cannot bind {dtype} tensors ({name}); use fp32 or fp16 engines")
        self.name = "onnxruntime-cuda" if device.type == "cuda" else "onnxruntime-cpu"
        if self.precision == INT8:
            self.precision_why = "int8 files (QDQ bricks, fp32 embedder), run by ONNX Runtime's int8 kernels"
        self.sessions: dict[str, Any] = {}
        self._bindings = BindingCache(max_bindings)
        self._run_options: Any = None
        self._stream: torch.cuda.Stream | None = None

    def load(self) -> None:
        ort = import_onnxruntime()
        stream = None
        if self.device.type == "cuda":
            # ORT launches its kernels on a torch stream of ours (ORT ignores handle 0, torch's default stream);
            # infer() orders it after and before the chain's stream with events, without a host wait.
            self._stream = torch.cuda.Stream(self.device)
            stream = self._stream.cuda_stream
        settings = SessionSettings(
            device=self.device,
            stream=stream,
            threads=self.threads,
            optimization=self.optimization,
            arena=self.arena,
            spin=self.spin,
        )
        self._run_options = ort.RunOptions()
        if self.device.type == "cuda":
            # The chain reads the outputs on the same stream; a host wait after every engine would only stall it.
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")
        for name, entry in self.engines_to_load().items():
            self.sessions[name] = session_from_onnx(entry.path(self.engine_dir), settings, config=self.config)
        self._load_vae()
        log.info(
            "onnxruntime %s: %d sessions, %d threads, optimization %s",
            ort.__version__,
            len(self.sessions),
            self.threads,
            self.optimization,
        )

    def close(self) -> None:
        self._bindings.clear()
        self.sessions.clear()

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        self.require_loaded()
        if self.decodes_eagerly(call):
            return self._eager_decode(inputs, outputs)
        key = buffers_key(call.engine, inputs, outputs)
        binding = self._bindings.get(key, lambda: self._make_binding(call, inputs, outputs))
        if self._stream is None:
            self.sessions[call.engine].run_with_iobinding(binding, self._run_options)
            return
        chain_stream = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(chain_stream)  # inputs written by the chain
        self.sessions[call.engine].run_with_iobinding(binding, self._run_options)
        chain_stream.wait_stream(self._stream)  # outputs read by the chain

    def _make_binding(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> Any:
        session = self.sessions[call.engine]
        binding = session.io_binding()
        device_type = "cuda" if self.device.type == "cuda" else "cpu"
        device_id = self.device.index or 0
        for names, tensors, bind in (
            ([i.name for i in session.get_inputs()], inputs, binding.bind_input),
            ([o.name for o in session.get_outputs()], outputs, binding.bind_output),
        ):
            for name in names:
                t = tensors.get(name)
                if t is None or not t.is_contiguous() or t.device != self.device or t.dtype not in _NUMPY:
                    raise UsageError(
                        f"{call.engine}.{name}: pass a contiguous {self.device} tensor of "
                        f"{' or '.join(map(str, _NUMPY))}, got "
                        + ("nothing" if t is None else f"{t.dtype} on {t.device}, contiguous={t.is_contiguous()}")
                    )
                bind(
                    name=name,
                    device_type=device_type,
                    device_id=device_id,
                    element_type=_NUMPY[t.dtype],
                    shape=tuple(t.shape),
                    buffer_ptr=t.data_ptr(),
                )
        return binding


# ---------------------------------------------------------------------------- registry entries


def _problem(manifest: Manifest, cuda: bool) -> str | None:
    if "onnx" not in manifest.formats():
        return "no ONNX files"
    try:
        import_onnxruntime()
    except BackendError as err:
        return str(err)
    if cuda and not cuda_provider_available():
        return "no CUDA for ONNX Runtime (needs onnxruntime-gpu and a visible GPU)"
    return None


def _build(manifest: Manifest | None, engine_dir: Path | None, opts: BackendOptions, cuda: bool) -> OnnxRuntimeBackend:
    assert manifest is not None and engine_dir is not None
    name = "onnxruntime-cuda" if cuda else "onnxruntime-cpu"
    check_file_precision(name, opts.precision, manifest.engines_for("onnx"))
    if opts.threads is not None:
        check_threads(opts.threads)
    device = torch.device("cuda", opts.local_rank) if cuda else torch.device("cpu")
    return OnnxRuntimeBackend(
        manifest, engine_dir, device=device, threads=opts.threads, optimization=opts.ort_optimization,
        arena=opts.ort_arena,
    )  # fmt: skip


_ORT_OPTIONS = frozenset({"threads", "precision", "ort_optimization", "ort_arena"}) | DECODER_OPTIONS
CPU_KIND = BackendKind(
    name="onnxruntime-cpu",
    format="onnx",
    problem=lambda manifest, opts: _problem(manifest, cuda=False),
    build=lambda manifest, engine_dir, opts: _build(manifest, engine_dir, opts, cuda=False),
    uses=_ORT_OPTIONS,
    chosen="ONNX Runtime runs the ONNX files on the CPU",
)
CUDA_KIND = BackendKind(
    name="onnxruntime-cuda",
    format="onnx",
    problem=lambda manifest, opts: _problem(manifest, cuda=True),
    build=lambda manifest, engine_dir, opts: _build(manifest, engine_dir, opts, cuda=True),
    uses=_ORT_OPTIONS,
    chosen="ONNX Runtime has CUDA",
)
