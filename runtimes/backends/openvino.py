"""OpenVINO backend: the manifest's ONNX files compiled for the CPU in fp32, bf16 or int8, I/O on the chain's buffers.

fp32 files stay as exported; the precision is OpenVINO's
``INFERENCE_PRECISION_HINT`` chosen when the backend loads
(:func:`runtimes.backends.precision.resolve_precision`): ``auto`` is bf16
where the CPU has AMX or AVX512-BF16 units, where OpenVINO runs the matmuls
on them and keeps its own fp32 islands (normalisation statistics, softmax
accumulation), else fp32.  int8 files (``lego-export --precision int8``, QDQ)
run their quantized products as int8 kernels (VNNI, AMX-INT8) and the ops they
leave in float at bf16 where the CPU has bf16 units, else fp32.

Each engine's ONNX file is read once at load and compiled per input shape
(rows, H, W): the model reshaped to that static shape, compiled on the first
call at it, one infer request each, at most :data:`SHAPES_PER_ENGINE` shapes
per engine kept (least recently used first out), with OpenVINO's snippets
only on bricks of long tiles (:func:`snippets_for`, :func:`compile_config`).
Measured per denoiser call on the 2-core Intel AMX machine, interleaved,
dynamic axes with snippets everywhere against static shapes without them:
lego_S_PG_64 batch 1 64x64 bf16 50.5 -> 45.1 ms, int8 44.8 -> 40.3, fp32
145 -> 142; the shipped model at batch 16 bf16 7.7 -> 5.6, int8 7.6 -> 6.0.
(On AMD Zen 4 static shapes alone had measured alike.)  The price is a compile per new
shape (0.1-0.6 s per engine of lego_S_PG_64, less from the model cache) and
the memory of each compiled shape.  Inputs and outputs are ``ov.Tensor`` views of
the chain's torch buffers (zero copy, shared memory); a request is rebound
when the buffers handed in change (their data pointers or shapes), since the
chain's ping-pong buffers swap roles between skip patterns.  OpenVINO's model
cache (``CACHE_DIR``, one directory per precision and snippets setting under
:func:`default_model_cache`) keeps compiled blobs keyed by OpenVINO on the
model (its shapes included) and the device, so a later load skips
compilation.

Calls are serialised by one lock: an infer request bound to shared buffers serves one caller at a time.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from export.records import VAE_ENGINE
from lego_model.errors import first_line
from lego_model.files import default_cache_dir
from lego_model.flops import embedder_flops
from runtimes.backends.base import (
    DECODER_OPTIONS,
    BackendKind,
    BackendOptions,
    BindingCache,
    EngineBackend,
    EngineCall,
    buffers_key,
    check_threads,
    default_threads,
)
from runtimes.backends.precision import INT8, files_precision, int8_rest_precision, resolve_precision
from runtimes.errors import BackendError, UsageError

if TYPE_CHECKING:
    from export.records import Manifest
    from lego_model.configs import LegoConfig

log = logging.getLogger(__name__)

# OpenVINO's names for the inference precisions.
_HINTS = {"fp32": "f32", "bf16": "bf16"}
# Compiled input shapes kept per engine: a batch size with and without guidance at two image sizes.
SHAPES_PER_ENGINE = 4
# A brick whose tiles hold at least this many tokens is compiled with OpenVINO's snippets (see snippets_for).
SNIPPETS_MIN_TILE_TOKENS = 256
# The embedder at a shape of fewer FLOPs than this runs on one thread (see threads_for).
EMBEDDER_ONE_THREAD_FLOPS = 16_000_000


MISSING = "openvino is not installed: pip install 'lego-deploy[cpu]' (or pip install openvino)"


def import_openvino() -> Any:
    """The openvino module, or a BackendError that says which extra installs it."""
    try:
        import openvino
    except ImportError:
        raise BackendError(MISSING) from None
    return openvino


def openvino_available() -> bool:
    """Whether the openvino package is importable here (without importing it)."""
    return importlib.util.find_spec("openvino") is not None


def default_model_cache() -> Path:
    """``openvino/`` under the project's cache directory ($LEGO_CACHE_DIR or ~/.cache/lego-deploy)."""
    return default_cache_dir() / "openvino"


def snippets_for(config: LegoConfig, brick: int | None) -> bool:
    """Whether an engine is compiled with OpenVINO's snippets (its fused attention and eltwise kernels).

    Only bricks whose tiles hold at least :data:`SNIPPETS_MIN_TILE_TOKENS`
    tokens, and never where a tile holds as many tokens as the model has
    heads.  Measured on the 2-core Intel AMX machine, interleaved, static
    shapes: the fused attention saved 7-9% of a 1024-token tile attention in
    bf16 (lego_S_PG_64's brick2: 1.09-1.11x in bf16, 1.07x in int8) and 3-8%
    at 256 tokens, but cost 5% at 64 tokens and 20-25% on the bricks of
    4-token tiles (lego_S_PG_64's brick0, every brick of the shipped model).
    On the 2-core AMD EPYC Zen 4 the shipped model's 16- and 64-token bricks
    ran 0.95-1.00x with them (batch 16, 2 threads, bf16 and int8 files).
    OpenVINO 2026.4's fused attention miscomputes in fp32 (relative L2
    0.5-0.85) when the tile's token count equals the head count (2, 4, 8, 16
    tested; the tiny test models' brick0 has 4 and 4); it was right on every
    other shape tried (96 with 64-256 tokens, batches 1-16, 4-16 heads).
    """
    if brick is None:  # the embedder (two small matmuls) and the VAE decoder: nothing for snippets to fuse
        return False
    tokens = config.tile_tokens(brick)
    return tokens >= SNIPPETS_MIN_TILE_TOKENS and tokens != config.num_heads


def threads_for(config: LegoConfig, engine_kind: str, rows: int, threads: int) -> int:
    """The threads one engine is compiled with at a shape of ``rows`` rows: ``threads``, but one for an embedder
    of under :data:`EMBEDDER_ONE_THREAD_FLOPS` there.

    The embedder is a few [rows, 256] x [256, D] products whose time is
    OpenVINO's per-node dispatch: a second thread only adds its wake-up and
    join.  Measured on the 2-core AMD EPYC Zen 4 machine (bf16, requests bound
    to fixed buffers, interleaved medians), one thread against two: the shipped
    model 39 vs 45 us at batch 1, 27 vs 51 at 8, 61 vs 128 at 32, 252 vs 198 at
    128 (12.9 MFLOP); lego_S_PG_64 63 vs 85 us at batch 1, 104 vs 143 at 8,
    283 vs 205 at 32 (40 MFLOP).
    """
    if engine_kind == "embedder" and embedder_flops(config, rows) < EMBEDDER_ONE_THREAD_FLOPS:
        return 1
    return threads


def compile_config(precision: str, threads: int, snippets: bool = False) -> dict[str, str]:
    """The CPU plugin's settings for one engine: the inference precision of its float ops (fp32 or bf16; an int8
    file's quantized products run in int8 whatever it is), one stream with ``threads`` threads, latency first,
    with OpenVINO's snippets where ``snippets`` (:func:`snippets_for`)."""
    return {
        "INFERENCE_PRECISION_HINT": _HINTS[precision],
        # One request at a time, as fast as possible: one stream with all the threads.  Splitting a call's rows
        # over one-thread streams (two requests run at once) was measured on the 2-core AMD EPYC Zen 4, shipped
        # model at batch 16 and 32, bf16 and int8 files: medians of per-round ratios 0.95-1.13x, quartiles
        # spanning 1.0 in three of the four: no steady gain for a second compile per shape, not adopted.
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_NUM_THREADS": str(threads),
        "SNIPPETS_MODE": "ENABLE" if snippets else "DISABLE",
    }


class OpenVinoBackend(EngineBackend):
    """Runs the manifest's ONNX files with OpenVINO on the CPU at a precision chosen at load time."""

    name = "openvino"

    def __init__(
        self,
        manifest: Manifest,
        engine_dir: str | Path,
        *,
        precision: str = "auto",
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(manifest, engine_dir, "onnx", torch.device("cpu"))
        for tensor, dtype in vars(self.dtypes).items():
            if dtype != torch.float32:
                raise BackendError(
                    f"OpenVINO runs float32 engine I/O, these engines have {dtype} {tensor}; "
                    "export with lego-export --engines onnx (float32 I/O at every precision)"
                )
        files = files_precision(self.entries)
        self.precision, self.precision_why = resolve_precision(precision, self.device, files=files)
        # What OpenVINO computes the float ops in: the run precision, or for int8 files what they leave in float.
        self.float_precision = int8_rest_precision(self.device)[0] if self.precision == INT8 else self.precision
        if files not in ("fp32", INT8):
            self.precision_why += f"; files exported in {files}"
        self.threads = threads or default_threads()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_model_cache()
        self._core: Any = None
        # engine -> (ov.Model with dynamic axes, float precision, whether snippets are on)
        self._models: dict[str, tuple[Any, str, bool]] = {}
        # Per engine, per input shapes: its compiled request, at most SHAPES_PER_ENGINE (least recently used out).
        self._shaped: dict[str, BindingCache] = {}
        # Per engine: the request of its latest call, and whether that shape's compile came from the model cache.
        self.requests: dict[str, Any] = {}
        self.loaded_from_cache: dict[str, bool] = {}
        # Every request is shared by every chain on this backend and re-pointed whenever it is handed other
        # tensors, under the lock (an infer request is not thread-safe; a compile happens under it too).
        self._lock = threading.Lock()

    def load(self) -> None:
        ov = import_openvino()
        self._core = ov.Core()
        for name, entry in self.engines_to_load().items():
            # The VAE decoder runs fp32 whatever the bricks run: diffusers upcasts this VAE, and its engine is
            # exported and verified in fp32 (the contract's vae_decoder).
            precision = "fp32" if name == VAE_ENGINE else self.float_precision
            path = entry.path(self.engine_dir)
            try:
                model = self._core.read_model(str(path))
            except RuntimeError as err:
                raise BackendError(
                    f"OpenVINO cannot read {path}: {first_line(err)}; re-export with lego-export --force"
                ) from None
            self._models[name] = (model, precision, snippets_for(self.config, entry.brick))
            self._shaped[name] = BindingCache(SHAPES_PER_ENGINE)
        self._load_vae()
        log.info(
            "openvino %s: %d engines, %s, %d threads, compiled per input shape (model cache %s)",
            ov.__version__,
            len(self._models),
            self.precision,
            self.threads,
            self.cache_dir,
        )

    def _request_for(self, engine: str, inputs: Mapping[str, Tensor]) -> _ShapedRequest:
        """``engine``'s request for these input shapes, compiled on the first call at them (under the lock)."""
        shapes = tuple((name, tuple(t.shape)) for name, t in inputs.items())

        def compile_shape() -> _ShapedRequest:
            dynamic, precision, snippets = self._models[engine]
            model = dynamic.clone()
            model.reshape(dict(shapes))
            entry = self.engines_to_load()[engine]
            rows = next(iter(inputs.values())).shape[0]
            threads = threads_for(self.config, entry.kind, rows, self.threads)
            compiled = self._compile(model, entry.path(self.engine_dir), precision, snippets, threads)
            self.loaded_from_cache[engine] = bool(compiled.get_property("LOADED_FROM_CACHE"))
            return _ShapedRequest(compiled.create_infer_request())

        return self._shaped[engine].get(shapes, compile_shape)

    def _compile(self, model: Any, path: Path, precision: str, snippets: bool, threads: int) -> Any:
        """``model`` (read from ``path``) compiled for the CPU with its float ops at ``precision`` (and snippets
        or not) on ``threads`` threads (:func:`threads_for`), through the model cache of those settings."""
        config = compile_config(precision, threads, snippets)
        # One cache directory per precision hint: OpenVINO's cache key leaves INFERENCE_PRECISION_HINT out (2026.4),
        # and an fp32 blob loaded with the bf16 hint returned NaN.  (An int8 file is another model: the key has it.)
        # Likewise per snippets setting, which the key may leave out too.
        cache = self.cache_dir / (f"{precision}-snippets" if snippets else precision)
        try:
            cache.mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache)
        except OSError as err:  # a read-only home: compile every time rather than refuse
            log.warning("OpenVINO model cache %s not writable (%s); compiling without it", cache, err)
        try:
            return self._core.compile_model(model, "CPU", config)
        except RuntimeError as err:
            raise BackendError(
                f"OpenVINO cannot compile {path}: {first_line(err)}; re-export with lego-export --force"
            ) from None

    def close(self) -> None:
        self._shaped.clear()
        self._models.clear()
        self.requests.clear()

    def infer(self, call: EngineCall, inputs: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> None:
        self.require_loaded()
        if self.decodes_eagerly(call):
            return self._eager_decode(inputs, outputs)
        key = buffers_key(call.engine, inputs, outputs)
        with self._lock:
            shaped = self._request_for(call.engine, inputs)
            if shaped.bound != key:  # checked only when the buffers change, not on every call
                tensors = [*inputs.items(), *outputs.items()]
                for name, t in tensors:
                    if not t.is_contiguous() or t.device.type != "cpu":
                        raise UsageError(f"{call.engine}.{name}: pass a contiguous CPU tensor, got one on {t.device}")
                shaped.rebind(tensors, key)
            self.requests[call.engine] = shaped.request
            shaped.request.infer()


class _ShapedRequest:
    """One engine's infer request at one input shape, and the torch tensors it is bound to (held so that the
    memory an ``ov.Tensor`` points at outlives the binding)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.bound: Hashable | None = None  # buffers_key of the tensors below
        self.held: list[Tensor] = []

    def rebind(self, tensors: list[tuple[str, Tensor]], key: Hashable) -> None:
        """Point the request's inputs and outputs at the torch buffers' memory (no copy)."""
        import openvino as ov

        for name, t in tensors:
            self.request.set_tensor(name, ov.Tensor(t.numpy(), shared_memory=True))
        self.bound, self.held = key, [t for _, t in tensors]


# ---------------------------------------------------------------------------- registry entry


def _problem(manifest: Manifest, opts: BackendOptions) -> str | None:
    if "onnx" not in manifest.formats():
        return "no ONNX files"
    if not openvino_available():
        return MISSING
    return None


def _build(manifest: Manifest | None, engine_dir: Path | None, opts: BackendOptions) -> OpenVinoBackend:
    assert manifest is not None and engine_dir is not None
    import_openvino()  # refuse here, naming the extra, rather than when the backend loads
    if opts.threads is not None:
        check_threads(opts.threads)
    return OpenVinoBackend(manifest, engine_dir, precision=opts.precision, threads=opts.threads)


KIND = BackendKind(
    name="openvino",
    format="onnx",
    problem=_problem,
    build=_build,
    uses=frozenset({"threads", "precision"}) | DECODER_OPTIONS,
    chosen="OpenVINO is the fastest CPU backend in the benchmarks",
)
