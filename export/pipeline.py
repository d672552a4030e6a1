"""An engine directory from a model: ONNX per engine, verification, TensorRT plans, manifest, atomic replace.

Nothing a user has is half-written or deleted: the target is checked first
(writable; an existing one needs --force and may hold only what a previous
export wrote), everything is built in a temporary directory beside it (same
file system), the manifest is re-read and its hashes checked there, and only
then does the directory take the target's place, in one atomic exchange where
the system has one (:mod:`export.atomic`, the transaction).  A failure or an
interrupt at any earlier point removes the temporary directory and leaves the
target as it was; the temporary directory of a killed export is removed by the
next export into the same target.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import onnx
import torch

from export.atomic import remove_stale_temporaries, staged_replacement
from export.calibration import Calibration, CalibrationSettings, record_calibration
from export.errors import ExportError, ManifestError
from export.identity import engine_identity
from export.manifest import MANIFEST_NAME, load_manifest, read_manifest_json, write_manifest
from export.onnx_export import DEFAULT_OPSET, check_onnx, onnx_from_spec
from export.records import BuiltWith, CheckpointRecord, EngineEntry, Manifest, Profile, VaeRecord, Verification
from export.specs import check_profile, default_profile, engine_specs
from export.vae_spec import DEFAULT_VAE_BATCH, vae_decoder_spec, vae_profile, vae_record
from export.verify import onnx_runner, verification_shapes, verify_engine
from lego_model.checkpoints import file_sha256
from lego_model.configs import LegoConfig
from lego_model.files import check_writable, default_cache_dir
from lego_model.model import LegoModel
from lego_model.vae import Vae

log = logging.getLogger(__name__)

ENGINE_CHOICES = ("onnx", "trt", "all")
INT8 = "int8"


def engine_precision(kind: str, precision: str) -> str:
    """The precision an engine of ``kind`` is exported in when the export asks for ``precision``.

    An int8 export quantizes the bricks and keeps the embedder in fp32 (export.quantize says why).
    """
    return "fp32" if precision == INT8 and kind != "brick" else precision


@dataclass(frozen=True)
class ExportOptions:
    """What to build; the CLI's options."""

    engines: str = "onnx"  # "onnx" | "trt" | "all"
    precision: str = "fp32"
    profile: Profile | None = None  # None: default_profile(config)
    opset: int = DEFAULT_OPSET
    force: bool = False
    exporter: str = "dynamo"
    cache_dir: Path | None = None  # TensorRT timing and engine caches; None: lego_model.files.default_cache_dir()
    seed: int = 0  # of the verification inputs
    vae: Vae | None = None  # adds a vae_decoder engine (latent models), always fp32 (export.vae_spec)
    vae_batch: tuple[int, int, int] = DEFAULT_VAE_BATCH  # its own batch range: guidance does not double it
    # int8: the trajectories that calibrate the quantizer (None: CalibrationSettings' defaults with ``seed``).
    calibration: CalibrationSettings | None = None


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


_MOVE_OUT = "move them elsewhere or choose another --out"


def export_target(out: str | Path) -> Path:
    """The directory an export into ``out`` replaces: ``out``, or the directory it links to when it is a symlink.

    Replacing the link's target (not the link) keeps the user's link, and the
    engines on the file system the link points at.
    """
    out = Path(out).absolute()  # "." or "engines/" still name a directory with a parent to build beside
    if not out.is_symlink():
        return out
    target = out.resolve()
    if not target.exists():
        raise ExportError(f"{out} is a symbolic link to {target}, which does not exist; create it or remove the link")
    return target


def check_target(out: str | Path, force: bool, inputs: Sequence[str | Path | None] = ()) -> Path:
    """Refuse a target an export must not replace or cannot write; returns :func:`export_target`.

    Checked before any compute: the parent of the target must be a writable
    directory (or creatable in one, :func:`lego_model.files.check_writable`),
    and so must an existing target; an existing target needs ``force`` and
    may hold only what a previous export wrote (the files its manifest lists);
    none of ``inputs`` (the checkpoint, the cache directory) may lie inside it.
    Temporaries that killed exports left beside the target are cleaned up first
    (:func:`remove_stale_temporaries`).
    """
    shown = Path(out)
    real = export_target(out)
    if real.parent.is_dir():
        remove_stale_temporaries(real)  # first: a set-aside directory moved back is an existing target
    for path in inputs:
        if path is not None and Path(path).absolute().resolve().is_relative_to(real.resolve()):
            raise ExportError(f"{path} lies inside --out {shown}, which the export replaces; {_MOVE_OUT}")
    check_writable(real.parent if real.exists() else real, "--out")  # the new directory is built beside it
    if real.is_dir():
        check_writable(real, "--out")  # its old content is deleted after the swap
    if not real.exists():
        return real
    if not real.is_dir():  # first: --force would not replace a file either
        raise ExportError(f"{shown} exists and is not a directory; remove it or choose another --out")
    if not force:
        raise ExportError(f"{shown} already exists; pass --force to replace it or choose another --out")
    foreign = foreign_files(real)
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        what = "files no lego-export wrote" if (real / MANIFEST_NAME).is_file() else f"files and no {MANIFEST_NAME}"
        raise ExportError(
            f"refusing to replace {shown}: it is not an engine directory of lego-export, it holds {what} "
            f"({', '.join(foreign[:5])}{more}); {_MOVE_OUT}"
        )
    return real


@contextlib.contextmanager
def staged_directory(out: str | Path, force: bool, inputs: Sequence[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a fresh directory beside ``out``; on normal exit it replaces ``out``, on any exception it vanishes.

    :func:`check_target` first (``force``, ``inputs``), then the atomic
    transaction of :func:`export.atomic.staged_replacement`.
    """
    with staged_replacement(check_target(out, force, inputs), shown=out) as staging:
        yield staging


def previous_export_files(engine_dir: Path) -> set[str]:
    """Relative paths a previous export wrote into ``engine_dir``: its manifest and every file the manifest lists.

    Read leniently (any schema version, hashes not checked): a directory whose
    engines were tampered with or that an older lego-export wrote may still be
    replaced, but only a manifest says what is ours.
    """
    manifest = engine_dir / MANIFEST_NAME
    try:
        data = read_manifest_json(manifest, fix=None)
    except ManifestError as err:
        raise ExportError(
            f"cannot tell which files in {engine_dir} a previous export wrote ({err}); remove the directory yourself "
            "or choose another --out"
        ) from None
    engines = data.get("engines") if isinstance(data, dict) else None
    files = {MANIFEST_NAME}
    for entry in engines if isinstance(engines, list) else []:
        file = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(file, str) and file:
            files.add(PurePosixPath(file).as_posix())
    return files


def foreign_files(engine_dir: Path) -> list[str]:
    """Everything inside ``engine_dir`` that a previous export did not write (relative paths, sorted)."""
    if not (engine_dir / MANIFEST_NAME).is_file():
        return sorted(p.name for p in engine_dir.iterdir())
    ours = previous_export_files(engine_dir)
    folders = {parent.as_posix() for f in ours for parent in PurePosixPath(f).parents}
    foreign = []
    for root, dirs, files in os.walk(engine_dir):  # symlinked folders are listed, not followed
        base = Path(root).relative_to(engine_dir)
        for name in dirs:
            rel = (base / name).as_posix()
            if rel not in folders or (Path(root) / name).is_symlink():
                foreign.append(rel + "/")
        dirs[:] = [d for d in dirs if (base / d).as_posix() in folders]
        foreign += [(base / name).as_posix() for name in files if (base / name).as_posix() not in ours]
    return sorted(foreign)


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


@dataclass(frozen=True)
class _Job:
    """One engine of an export: its spec, what it is exported from (the model or the VAE), its weights' record,
    precision, profile and verification shapes."""

    spec: Any
    source: Any
    weights: CheckpointRecord
    precision: str
    profile: Profile
    shapes: list[tuple[int, int, int]]


@dataclass(frozen=True)
class _Build:
    """What every engine of one export shares."""

    config: LegoConfig
    options: ExportOptions
    staging: Path
    onnx_dir: Path  # the staging directory, or a scratch folder in it when only TensorRT plans are kept
    calibration: Calibration | None
    trt_env: Any
    say: Callable[[str], None]


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
    inputs = [checkpoint.path]
    if options.vae is not None:  # a --vae inside --out would go with the directory it replaces
        inputs.append(options.vae.source)
    trt_env = None
    if options.engines in ("trt", "all"):
        from export.tensorrt_build import require_tensorrt  # raises before anything is written

        trt_env = require_tensorrt(options.engines)
        inputs.append(options.cache_dir or default_cache_dir())
    check_target(out, options.force, inputs)  # before any work: the target must be ours to replace and writable
    jobs, decoder = _jobs(model, checkpoint, options, profile)
    started = time.perf_counter()
    say(
        f"exporting {len(jobs)} engines of {config.name} ({options.precision}, {options.engines}) to {out}; "
        f"profile {profile.describe()}; verifying at {', '.join(f'{b}x{h}x{w}' for b, h, w in jobs[0].shapes)}"
    )
    calibration = None
    if options.precision == INT8:
        from export.quantize import import_nncf

        import_nncf()  # refuse a missing nncf before minutes of sampling
        t0 = time.perf_counter()
        calibration = record_calibration(model, options.calibration or CalibrationSettings(seed=options.seed))
        say(f"int8 calibration: {calibration.describe()}, {time.perf_counter() - t0:.1f} s")
    with staged_directory(out, options.force, inputs) as staging:
        onnx_dir = staging if options.engines != "trt" else staging / ".onnx-build"
        onnx_dir.mkdir(exist_ok=True)
        build = _Build(config, options, staging, onnx_dir, calibration, trt_env, say)
        built = [row for i, job in enumerate(jobs, 1) for row in _export_job(build, job, f"[{i}/{len(jobs)}]")]
        if onnx_dir != staging:
            shutil.rmtree(onnx_dir)
        manifest = Manifest(
            config=config,
            checkpoint=checkpoint,
            engines=[entry for entry, _ in built],
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            vae=decoder,
        )
        write_manifest(manifest, staging)
        load_manifest(staging)  # the directory must pass the runtimes' own checks before it replaces anything
    reports = [report for _, report in built]
    return ExportResult(manifest=manifest, out=out, reports=reports, seconds=time.perf_counter() - started)


def _jobs(
    model: LegoModel, checkpoint: CheckpointRecord, options: ExportOptions, profile: Profile
) -> tuple[list[_Job], VaeRecord | None]:
    """The engines to export -- the denoiser's, then the decoder's (fp32 always, its own batch range, the VAE's
    weights) -- and the VAE record for the manifest (None without ``options.vae``)."""
    config = model.config
    shapes = verification_shapes(config, profile)
    jobs = [
        _Job(spec, model, checkpoint, engine_precision(spec.kind, options.precision), profile, shapes)
        for spec in engine_specs(config)
    ]
    if options.vae is None:
        return jobs, None
    decoder = vae_record(options.vae)
    decoder_profile = vae_profile(profile, options.vae_batch)
    spec = vae_decoder_spec(options.vae, config)
    decoder_shapes = verification_shapes(config, decoder_profile)
    jobs.append(_Job(spec, options.vae, decoder.weights(), "fp32", decoder_profile, decoder_shapes))
    return jobs, decoder


def _export_job(build: _Build, job: _Job, step: str) -> list[tuple[EngineEntry, EngineReport]]:
    """One engine: its ONNX file exported (int8: quantized) and verified, and its TensorRT plan where asked;
    the manifest entries and summary rows of what is kept."""
    spec, source, precision, options, say = job.spec, job.source, job.precision, build.options, build.say
    t0 = time.perf_counter()
    onnx_path = build.onnx_dir / f"{spec.name}.onnx"
    say(f"{step} {spec.name}: ONNX export ({precision})")
    identity = engine_identity(spec.name, spec.kind, spec.brick, precision, build.config, job.weights)
    if precision == INT8:
        exporter, quantized = _int8_onnx(spec, source, onnx_path, options, identity, build.calibration)
        note = f"{exporter}; {quantized}"
    else:
        exporter = note = onnx_from_spec(
            spec, source, onnx_path, precision, options.opset, options.exporter, identity=identity
        )
    shapes = _shapes_for(spec, job.shapes)
    runner = onnx_runner(spec, onnx_path, precision)
    verification = verify_engine(spec, source, runner, precision, shapes, seed=options.seed)
    seconds = time.perf_counter() - t0
    say(
        f"{step} {spec.name}: {onnx_path.stat().st_size / 1e6:.2f} MB, {seconds:.1f} s, "
        f"ONNX Runtime max rel err {verification.max_rel:.2e} (tolerance {verification.tolerance:g})"
    )
    built_with = onnx_built_with(exporter, options.opset)
    staging = build.staging
    onnx_entry = _entry(spec, onnx_path, staging, "onnx", precision, job.profile, built_with, verification)
    kept = []
    if options.engines in ("onnx", "all"):
        kept.append((onnx_entry, _report(onnx_entry, seconds, note)))
    if options.engines in ("trt", "all"):
        entry, seconds, note = _tensorrt_engine(
            spec, source, identity, onnx_entry, onnx_path, staging, options, job.profile, shapes, build.trt_env
        )
        say(f"{step} {spec.name}: TensorRT plan {entry.bytes / 1e6:.2f} MB, {seconds:.1f} s {note}")
        kept.append((entry, _report(entry, seconds, note)))
    return kept


def _int8_onnx(
    spec: Any,
    model: LegoModel,
    path: Path,
    options: ExportOptions,
    identity: dict[str, str],
    calibration: Calibration,
) -> tuple[str, str]:
    """The brick's fp32 ONNX file quantized into ``path`` (export.quantize); returns (exporter, what is int8)."""
    from export.quantize import int8_from_onnx

    fp32_path = path.with_name(f".{path.stem}.fp32.onnx")  # beside it, in the staging directory: removed below
    try:
        exporter = onnx_from_spec(spec, model, fp32_path, "fp32", options.opset, options.exporter)
        summary = int8_from_onnx(fp32_path, path, calibration.feeds[spec.name], identity)
    finally:
        fp32_path.unlink(missing_ok=True)
    check_onnx(path, spec)
    return exporter, summary.describe()


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
    model: LegoModel | Vae,
    identity: dict[str, str],
    onnx_entry: EngineEntry,
    onnx_path: Path,
    staging: Path,
    options: ExportOptions,
    profile: Profile,
    shapes: list[tuple[int, int, int]],
    env: Any,
) -> tuple[EngineEntry, float, str]:
    """Build (or take from the engine cache) one plan, verify it on the GPU, and describe it."""
    from export.tensorrt_build import cached_plan, plan_runner

    t0 = time.perf_counter()
    plan_path = staging / f"{spec.name}.plan"
    result = cached_plan(
        spec, onnx_path, plan_path, profile, env, options.cache_dir or default_cache_dir(),
        onnx_sha256=onnx_entry.sha256, precision=onnx_entry.precision, identity=identity,
        verify=lambda path: verify_engine(spec, model, plan_runner(spec, path), onnx_entry.precision, shapes,
                                          options.seed),
    )  # fmt: skip
    verification, note = result.verification, result.note
    built_with = dataclasses.replace(
        onnx_entry.built_with,
        tensorrt=result.builder.tensorrt_version,
        gpu=result.builder.gpu_name,  # who tuned the plan: on a cache hit the cache's record
        compute_capability=result.builder.compute_capability,
        onnx_sha256=onnx_entry.sha256,
        engine_cache_key=result.key,
    )
    entry = _entry(spec, plan_path, staging, "tensorrt", onnx_entry.precision, profile, built_with, verification)
    return entry, time.perf_counter() - t0, note
