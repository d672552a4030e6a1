"""TensorRT engines from the exported ONNX files (TensorRT >= 10 Python API, imported lazily).

* Strongly typed networks: the precision of every layer is the dtype the ONNX
  gives it (TensorRT 11 drops the weakly typed fp16/bf16 builder flags), so the
  fp32 islands of half-precision files (LayerNorm, softmax, sinusoid) survive.
* One optimization profile per engine, from the export's batch/height/width ranges.
* A timing cache shared by all bricks and all runs of one TensorRT version on
  one GPU model: later builds skip most kernel timing.  TensorRT refuses a
  cache made on another device; then the build goes on with a fresh one (one
  warning) that replaces it.
* An engine cache keyed by everything that determines the plan (ONNX sha256,
  precision, profile, TensorRT version, the GPU model and its compute
  capability -- an H100 and an H200 are both 9.0 but tune differently -- and
  the workspace limit): a plan is reused only when the whole key matches, never
  because a file exists, and only plans that passed verification are stored.
  Each entry records the GPU that built it, which the manifest then names.

The pure parts (cache keys, file names, the missing-dependency message) are
tested on any machine; building and running engines needs the ``trt`` marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError, MissingDependencyError, VerificationError
from export.identity import plan_name
from export.loaders import context_from_engine, engine_from_plan, plan_runtime
from export.records import Profile, Verification
from export.specs import EngineSpec, profile_shapes
from export.verify import EngineRunner
from lego_model.checkpoints import file_sha256
from lego_model.files import atomic_path, write_atomic

log = logging.getLogger(__name__)

# Bump when the builder settings below change, so that cached plans built with the old settings are not reused.
BUILD_RECIPE = 3  # 2: the network name carries the engine identity; 3: keyed by GPU model and workspace too
INSTALL_HINT = "install the gpu extra on a machine with an NVIDIA GPU: pip install -e '.[gpu]'"


@dataclass(frozen=True)
class TrtEnvironment:
    """What a TensorRT plan is tied to: the library version and the GPU it was built on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "major.minor", e.g. "9.0"


def missing_tensorrt_requirements() -> list[str]:
    """What is missing for TensorRT builds here (empty when they can run); imports nothing heavy if absent."""
    missing = []
    try:
        import tensorrt  # noqa: F401  lazy: only the gpu extra provides it
    except ImportError:
        missing.append("the tensorrt package")
    except Exception as err:  # a broken install (e.g. missing libnvinfer) raises OSError/RuntimeError
        missing.append(f"a working tensorrt package ({type(err).__name__}: {err})")
    import torch

    if not torch.cuda.is_available():
        missing.append("a CUDA GPU visible to torch (torch.cuda.is_available() is False)")
    return missing


def missing_tensorrt_message(missing: list[str], requested: str) -> str:
    """The one line ``--engines trt|all`` stops with."""
    return (
        f"--engines {requested} needs TensorRT and a CUDA GPU; missing here: {'; '.join(missing)}. "
        f"To fix, {INSTALL_HINT}"
    )


def require_tensorrt(requested: str = "trt") -> TrtEnvironment:
    """Raise :class:`MissingDependencyError` unless TensorRT and a GPU are usable; describe them otherwise."""
    missing = missing_tensorrt_requirements()
    if missing:
        raise MissingDependencyError(missing_tensorrt_message(missing, requested))
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return TrtEnvironment(trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}")


def engine_cache_key(
    onnx_sha256: str, precision: str, profile: Profile, env: TrtEnvironment, workspace_bytes: int | None = None
) -> str:
    """Hex sha256 identifying a plan; any difference in any part gives another key."""
    parts = engine_cache_parts(onnx_sha256, precision, profile, env, workspace_bytes)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def engine_cache_parts(
    onnx_sha256: str, precision: str, profile: Profile, env: TrtEnvironment, workspace_bytes: int | None = None
) -> dict[str, Any]:
    """The parts of a cache key, as recorded beside each cached plan (``workspace_bytes`` None: TensorRT's limit)."""
    return {
        "onnx_sha256": onnx_sha256,
        "precision": precision,
        "profile": profile.to_dict(),
        "tensorrt": env.tensorrt_version,
        "gpu": env.gpu_name,
        "compute_capability": env.compute_capability,
        "workspace_bytes": workspace_bytes,
        "recipe": BUILD_RECIPE,
    }


def timing_cache_name(env: TrtEnvironment) -> str:
    """Timing caches are valid for one TensorRT version on one GPU model (TensorRT checks the device's properties)."""
    gpu = re.sub(r"[^a-z0-9]+", "-", env.gpu_name.lower()).strip("-")
    return f"timing-trt{env.tensorrt_version}-sm{env.compute_capability.replace('.', '')}-{gpu}.cache"


@dataclass(frozen=True)
class CachedPlan:
    """A plan in the engine cache, and the environment that built it."""

    path: Path
    builder: TrtEnvironment


class EngineCache:
    """Plans stored as ``<key>.plan`` with ``<key>.json`` holding the key's parts, the plan's sha256 and its builder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def lookup(self, key: str, parts: dict[str, Any]) -> CachedPlan | None:
        """The cached plan for ``key`` if its recorded parts equal ``parts`` and its bytes are intact."""
        plan, meta = self.root / f"{key}.plan", self.root / f"{key}.json"
        try:
            record = json.loads(meta.read_text())
            builder = TrtEnvironment(**record["builder"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None
        if record.get("parts") != parts or not plan.is_file() or file_sha256(plan) != record.get("sha256"):
            log.info("engine cache entry %s is stale or damaged; rebuilding", key[:12])
            return None
        return CachedPlan(plan, builder)

    def store(self, key: str, parts: dict[str, Any], plan: Path, builder: TrtEnvironment) -> None:
        """Copy ``plan`` into the cache (each file whole, :func:`lego_model.files.atomic_path`: a reader never sees
        half a file, and a full disk leaves no temporary)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / f"{key}.plan") as tmp_plan:
            shutil.copyfile(plan, tmp_plan)
        record = {"parts": parts, "sha256": file_sha256(plan), "builder": dataclasses.asdict(builder)}
        write_atomic(self.root / f"{key}.json", json.dumps(record, sort_keys=True))


@dataclass(frozen=True)
class PlanResult:
    """What :func:`cached_plan` made: the cache key, who built the plan, its verification, how it was got."""

    key: str
    builder: TrtEnvironment
    verification: Verification
    note: str  # "(built)" or "(engine cache hit)"


def cached_plan(
    spec: EngineSpec,
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: Profile,
    env: TrtEnvironment,
    cache_dir: str | Path,
    *,
    onnx_sha256: str,
    precision: str,
    verify: Callable[[Path], Verification],
    identity: dict[str, str] | None = None,
    workspace_bytes: int | None = None,
) -> PlanResult:
    """The plan of ``spec`` at ``plan_path``: the engine cache's when the whole key matches, else built here.

    ``verify(plan_path)`` checks it either way and raises VerificationError on a
    bad plan, which is then not cached (a failing plan must not come back from
    the cache).  The result names the builder: this GPU for a build, the
    cache's record for a hit.
    """
    cache_dir, plan_path = Path(cache_dir), Path(plan_path)
    parts = engine_cache_parts(onnx_sha256, precision, profile, env, workspace_bytes)
    key = engine_cache_key(onnx_sha256, precision, profile, env, workspace_bytes)
    cache = EngineCache(cache_dir / "engines")
    hit = cache.lookup(key, parts)
    if hit is not None:
        shutil.copyfile(hit.path, plan_path)
        return PlanResult(key, hit.builder, verify(plan_path), "(engine cache hit)")
    timing = cache_dir / timing_cache_name(env)
    engine_from_onnx(spec, onnx_path, plan_path, profile, timing, workspace_bytes=workspace_bytes, identity=identity)
    verification = verify(plan_path)
    cache.store(key, parts, plan_path, env)
    return PlanResult(key, env, verification, "(built)")


def _attach_timing_cache(config: Any, path: Path) -> None:
    """Give the builder config the timing cache at ``path``, or a fresh one where TensorRT refuses that file.

    ``set_timing_cache(..., ignore_mismatch=False)`` refuses a cache made on
    another device (and ``get_timing_cache()`` is then None); taking it anyway
    (``ignore_mismatch=True``) would time kernels with another GPU's figures.
    """
    cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
    if config.set_timing_cache(cache, ignore_mismatch=False):
        return
    log.warning("the timing cache %s was made on another GPU or TensorRT; timing afresh (it will be replaced)", path)
    if not config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False):
        raise ExportError(f"TensorRT refused a fresh timing cache; delete {path.parent} and retry")


def engine_from_onnx(
    spec: EngineSpec,
    onnx_path: str | Path,
    plan_path: str | Path,
    profile: Profile,
    timing_cache: str | Path,
    workspace_bytes: int | None = None,
    identity: dict[str, str] | None = None,
) -> None:
    """Build one strongly typed TensorRT plan from an ONNX file with one optimization profile.

    ``identity`` (:func:`export.identity.engine_identity`) becomes the network's
    name, which the plan keeps (``ICudaEngine.name``) and the TensorRT backend checks.
    """
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 needs the flag; TensorRT 11 is always strongly typed and keeps the flag only as an ignored alias.
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"{spec.name}: TensorRT cannot parse {Path(onnx_path).name}: {errors}")
    if identity:
        network.name = plan_name(identity)
    config = builder.create_builder_config()
    # fp32 means fp32: TF32 matmuls would make fp32 engines differ from eager by ~1e-3.
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimization = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile_shapes(spec, profile).items():
        optimization.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(optimization)
    timing_cache = Path(timing_cache)
    _attach_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"{spec.name}: TensorRT failed to build an engine from {Path(onnx_path).name} (see its log)")
    Path(plan_path).write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(timing_cache, bytes(config.get_timing_cache().serialize()))


def plan_runner(spec: EngineSpec, plan_path: str | Path) -> EngineRunner:
    """A TensorRT plan on the GPU, for :func:`export.verify.verify_engine` (same loop as the ONNX check).

    Deserialized and given its context by the runtimes' loaders (:mod:`export.loaders`); the plan has no
    manifest entry yet, so its identity is checked when the runtimes load the directory.
    """
    import torch

    runtime = plan_runtime()
    engine = engine_from_plan(runtime, Path(plan_path).read_bytes(), str(plan_path))
    # The runtime must outlive its engine and the engine its context: the closure holds all three.
    held = (runtime, engine, context_from_engine(engine, spec.name))
    stream = torch.cuda.Stream()
    (out_name,) = spec.output_names

    def run(inputs: dict[str, torch.Tensor]) -> np.ndarray:
        context = held[2]
        device_inputs = {name: t.cuda().contiguous() for name, t in inputs.items()}
        for name, t in device_inputs.items():
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(out_name)), dtype=torch.float32, device="cuda")
        context.set_tensor_address(out_name, out.data_ptr())
        with torch.cuda.stream(stream):
            if not context.execute_async_v3(stream.cuda_stream):
                raise VerificationError("execute_async_v3 failed (run with a TensorRT log level of VERBOSE)")
        stream.synchronize()
        return out.cpu().numpy()

    return EngineRunner("tensorrt", run)
