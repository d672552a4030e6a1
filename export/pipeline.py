"""An engine directory from a model: ONNX per engine, verification, TensorRT plans, manifest, atomic replace.

Nothing a user has is half-written: everything is built in a temporary
directory beside the target (same file system, so the final step is a
rename), the manifest is re-read and its hashes checked there, and only then
does the directory take the target's place.  A failure or an interrupt at any
earlier point removes the temporary directory and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from export.errors import ExportError
from export.manifest import (
    MANIFEST_NAME,
    BuiltWith,
    CheckpointRecord,
    EngineEntry,
    Manifest,
    Profile,
    Verification,
    file_sha256,
    load_manifest,
    write_manifest,
)
from export.onnx_export import DEFAULT_OPSET, onnx_from_spec
from export.specs import check_profile, default_profile, engine_specs
from export.verify import onnx_runner, verification_shapes, verify_engine
from lego_model.model import LegoModel

log = logging.getLogger(__name__)

ENGINE_CHOICES = ("onnx", "trt", "all")


@dataclass(frozen=True)
class ExportOptions:
    """What to build; the CLI's options."""

    engines: str = "onnx"  # "onnx" | "trt" | "all"
    precision: str = "fp32"
    profile: Profile | None = None  # None: default_profile(config)
    opset: int = DEFAULT_OPSET
    force: bool = False
    exporter: str = "dynamo"
    cache_dir: Path | None = None  # TensorRT timing and engine caches; None: tensorrt_build.default_cache_dir()
    seed: int = 0  # of the verification inputs


@dataclass
class EngineReport:
    """One row of the closing summary."""

    name: str
    format: str
    precision: str
    bytes: int
    seconds: float
    max_rel: float
    note: str = ""


@dataclass
class ExportResult:
    manifest: Manifest
    out: Path
    reports: list[EngineReport] = field(default_factory=list)
    seconds: float = 0.0


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing target without ``force``, and anything that is not an engine directory even with it."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise ExportError(f"{out} exists and is not a directory; remove it or choose another --out")
    if any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise ExportError(
            f"refusing to replace {out}: it is not an engine directory (no {MANIFEST_NAME}); choose another --out"
        )


@contextlib.contextmanager
def staged_directory(out: str | Path, force: bool) -> Iterator[Path]:
    """Yield a fresh directory beside ``out``; on normal exit it replaces ``out``, on any exception it vanishes."""
    out = Path(out).absolute()  # "." or "engines/" still name a directory with a parent to build beside
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output directory
    try:
        yield staging
    except BaseException:  # KeyboardInterrupt included: nothing half-written stays behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_directory(staging, out)


def replace_directory(new: Path, out: Path) -> None:
    """Move ``new`` to ``out``; an existing ``out`` is set aside first and deleted only after the move."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    try:
        new.rename(out)
    except OSError:
        if old is not None:
            old.rename(out)
        shutil.rmtree(new, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def onnx_built_with(exporter: str, opset: int) -> BuiltWith:
    """``built_with`` of an ONNX file made here: software versions, exporter and opset (no GPU: it is portable)."""
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    return BuiltWith(
        torch=torch.__version__,
        onnx=onnx.__version__,
        onnxruntime=ort_version,
        python=platform.python_version(),
        exporter=exporter,
        opset=opset,
    )


def export_engine_dir(
    model: LegoModel,
    out: str | Path,
    checkpoint: CheckpointRecord,
    options: ExportOptions,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export, verify and (for trt/all) build every engine of ``model`` into ``out``; returns manifest and summary.

    ``checkpoint`` says where the weights came from (the manifest records it).  ``progress``
    receives one line per step (default: the log).
    """
    say = progress or log.info
    out = Path(out)
    model = model.eval()
    config = model.config
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ExportError("export a float32 model (load the checkpoint as is); --precision sets the engine precision")
    if options.engines not in ENGINE_CHOICES:
        raise ExportError(f"--engines must be one of {', '.join(ENGINE_CHOICES)}, got {options.engines!r}")
    profile = options.profile or default_profile(config)
    check_profile(profile, config)
    check_target(out, options.force)  # before any work: an existing target is an error
    want_onnx = options.engines in ("onnx", "all")
    want_trt = options.engines in ("trt", "all")
    trt_env = None
    if want_trt:
        from export.tensorrt_build import require_tensorrt  # raises before anything is written

        trt_env = require_tensorrt(options.engines)
    shapes = verification_shapes(config, profile)
    specs = engine_specs(config)
    started = time.perf_counter()
    reports: list[EngineReport] = []
    entries: list[EngineEntry] = []
    say(
        f"exporting {len(specs)} engines of {config.name} ({options.precision}, {options.engines}) to {out}; "
        f"profile {profile.describe()}; verifying at {', '.join(f'{b}x{h}x{w}' for b, h, w in shapes)}"
    )
    with staged_directory(out, options.force) as staging:
        onnx_dir = staging if want_onnx else staging / ".onnx-build"
        onnx_dir.mkdir(exist_ok=True)
        for i, spec in enumerate(specs, 1):
            t0 = time.perf_counter()
            onnx_path = onnx_dir / f"{spec.name}.onnx"
            say(f"[{i}/{len(specs)}] {spec.name}: ONNX export ({options.precision})")
            exporter = onnx_from_spec(spec, model, onnx_path, options.precision, options.opset, options.exporter)
            spec_shapes = _shapes_for(spec, shapes)
            runner = onnx_runner(spec, onnx_path, options.precision)
            verification = verify_engine(spec, model, runner, options.precision, spec_shapes, seed=options.seed)
            seconds = time.perf_counter() - t0
            say(
                f"[{i}/{len(specs)}] {spec.name}: {onnx_path.stat().st_size / 1e6:.2f} MB, {seconds:.1f} s, "
                f"ONNX Runtime max rel err {verification.max_rel:.2e} (tolerance {verification.tolerance:g})"
            )
            built_with = onnx_built_with(exporter, options.opset)
            onnx_entry = _entry(spec, onnx_path, staging, "onnx", options.precision, profile, built_with, verification)
            if want_onnx:
                entries.append(onnx_entry)
                reports.append(_report(onnx_entry, seconds, exporter))
            if want_trt:
                entry, seconds, note = _tensorrt_engine(
                    spec, model, onnx_entry, onnx_path, staging, options, profile, spec_shapes, trt_env
                )
                say(f"[{i}/{len(specs)}] {spec.name}: TensorRT plan {entry.bytes / 1e6:.2f} MB, {seconds:.1f} s {note}")
                entries.append(entry)
                reports.append(_report(entry, seconds, note))
        if not want_onnx:
            shutil.rmtree(onnx_dir)
        manifest = Manifest(
            config=config,
            checkpoint=checkpoint,
            engines=entries,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        write_manifest(manifest, staging)
        load_manifest(staging)  # the directory must pass the runtimes' own checks before it replaces anything
    return ExportResult(manifest=manifest, out=out, reports=reports, seconds=time.perf_counter() - started)


def _shapes_for(spec: Any, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """The embedder has no spatial dims: one check per distinct batch size."""
    if spec.kind != "embedder":
        return shapes
    return list(dict.fromkeys((b, 1, 1) for b, _, _ in shapes))


def _entry(
    spec: Any,
    path: Path,
    root: Path,
    fmt: str,
    precision: str,
    profile: Profile,
    built_with: BuiltWith,
    verification: Verification,
) -> EngineEntry:
    return EngineEntry(
        name=spec.name,
        kind=spec.kind,
        brick=spec.brick,
        file=path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name,
        format=fmt,
        precision=precision,
        inputs=list(spec.inputs),
        outputs=list(spec.outputs),
        profile=profile,
        sha256=file_sha256(path),
        bytes=path.stat().st_size,
        built_with=built_with,
        verification=verification,
    )


def _report(entry: EngineEntry, seconds: float, note: str) -> EngineReport:
    return EngineReport(
        name=entry.name,
        format=entry.format,
        precision=entry.precision,
        bytes=entry.bytes,
        seconds=seconds,
        max_rel=entry.verification.max_rel,
        note=note,
    )


def _tensorrt_engine(
    spec: Any,
    model: LegoModel,
    onnx_entry: EngineEntry,
    onnx_path: Path,
    staging: Path,
    options: ExportOptions,
    profile: Profile,
    shapes: list[tuple[int, int, int]],
    env: Any,
) -> tuple[EngineEntry, float, str]:
    """Build (or take from the engine cache) one plan, verify it on the GPU, and describe it."""
    from export.tensorrt_build import (
        EngineCache,
        default_cache_dir,
        engine_cache_key,
        engine_cache_parts,
        engine_from_onnx,
        plan_runner,
        timing_cache_name,
    )

    t0 = time.perf_counter()
    cache_dir = options.cache_dir or default_cache_dir()
    args = (onnx_entry.sha256, options.precision, profile, env.tensorrt_version, env.compute_capability)
    key, parts = engine_cache_key(*args), engine_cache_parts(*args)
    cache = EngineCache(cache_dir / "engines")
    plan_path = staging / f"{spec.name}.plan"
    cached = cache.lookup(key, parts)
    if cached is not None:
        shutil.copyfile(cached, plan_path)
        note = "(engine cache hit)"
    else:
        timing = cache_dir / timing_cache_name(env.tensorrt_version, env.compute_capability)
        engine_from_onnx(spec, onnx_path, plan_path, profile, timing)
        cache.store(key, parts, plan_path)
        note = "(built)"
    verification = verify_engine(spec, model, plan_runner(spec, plan_path), options.precision, shapes, options.seed)
    built_with = dataclasses.replace(
        onnx_entry.built_with,
        tensorrt=env.tensorrt_version,
        gpu=env.gpu_name,
        compute_capability=env.compute_capability,
        onnx_sha256=onnx_entry.sha256,
        engine_cache_key=key,
    )
    entry = _entry(spec, plan_path, staging, "tensorrt", options.precision, profile, built_with, verification)
    return entry, time.perf_counter() - t0, note
