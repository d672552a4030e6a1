"""The records of manifest.json: every field, its type and range, and the engine I/O contract they must satisfy.

Every record is a frozen dataclass read with exact keys: only lego-export
writes manifests, in one spelling, so a missing, unknown or mistyped field
means the directory was not written by this toolchain's exporter.  Each
``from_dict`` refuses with one :class:`ManifestError` line that says what to
do.  :func:`contract_io` is the engine contract of shared/DESIGN.md (the
inputs and outputs of each engine kind of a model config): the exporter's
specs are built from it and :meth:`Manifest.from_dict` checks every entry
against it.  Reading files (JSON, hashes, paths) is :mod:`export.manifest`'s
job; which engine a file is, :mod:`export.identity`'s.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from export.errors import REEXPORT, ManifestError, ProfileError
from lego_model.checkpoints import file_sha256
from lego_model.configs import MAX_SIDE, LegoConfig
from lego_model.errors import ConfigError
from lego_model.forwards import PRECISION_TORCH_DTYPES
from lego_model.sampler import MAX_BATCH

__all__ = [
    "DTYPES",
    "FORMATS",
    "IO_DTYPE",
    "KINDS",
    "MANIFEST_NAME",
    "PRECISIONS",
    "PROFILE_LIMITS",
    "SCHEMA_VERSION",
    "SYMBOLIC_DIMS",
    "TORCH_DTYPES",
    "VAE_ENGINE",
    "VAE_UPSCALE",
    "BuiltWith",
    "CheckpointRecord",
    "EngineEntry",
    "FileTensor",
    "Manifest",
    "MeasuredError",
    "Profile",
    "TensorSpec",
    "VaeRecord",
    "Verification",
    "contract_io",
]

# 2: checkpoint, built_with and verification became exact records (1 had free-form dicts).
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "tensorrt")
# Engine precisions (what --precision says): the forwards lego-export exports are computed in the first three;
# int8 bricks are fp32 forwards quantized after export (QDQ files, export.quantize), their embedder stays fp32.
PRECISIONS = (*PRECISION_TORCH_DTYPES, "int8")
# Tensor dtype names of the manifest -> torch dtypes (the runtimes' buffers, the exporter's casts).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = tuple(TORCH_DTYPES)
SYMBOLIC_DIMS = ("B", "H", "W")
VAE_ENGINE = "vae_decoder"
VAE_UPSCALE = 8  # image side per latent side of the Stable Diffusion VAE (the contract's 8h x 8w)
# The decoder's output sides are multiples of its input sides: "8*H", "8*W" (the ONNX files' own dim names).
_SCALED_DIM = re.compile(r"^[1-9][0-9]*\*[HW]$")
# Engine I/O is float32 at every precision (lego_model/forwards.py says why).
IO_DTYPE = "float32"
# Largest MAX of a profile range lego-export writes and the runtimes accept.  A TensorRT engine sizes its
# scratch memory for the profile's largest shape, and the runtimes allocate it once at load: a batch of
# 999999999 or a 100000-pixel side would be recorded as a promise no GPU keeps (and try to allocate it).
PROFILE_LIMITS = {"batch": MAX_BATCH, "height": MAX_SIDE, "width": MAX_SIDE}


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: name, dtype and shape with symbolic "B", "H", "W" dimensions."""

    name: str
    dtype: str  # "float32" | "float16" | "bfloat16"
    shape: list[int | str]

    def concrete(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        """The shape with its symbolic dims "B", "H", "W" (and scaled ones such as "8*H") replaced by sizes."""
        sizes = {"B": batch, "H": height, "W": width}

        def size(dim: int | str) -> int:
            if isinstance(dim, int):
                return dim
            factor, _, name = dim.rpartition("*")
            return int(factor or 1) * sizes[name]

        return tuple(size(d) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        d = _exact_keys(d, ("name", "dtype", "shape"), where)
        name = _require(d, "name", str, where)
        dtype = _require(d, "dtype", str, where)
        if dtype not in DTYPES:
            raise ManifestError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}; {REEXPORT}")
        shape = _require(d, "shape", list, where)
        for dim in shape:
            ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0) or (
                isinstance(dim, str) and (dim in SYMBOLIC_DIMS or _SCALED_DIM.match(dim) is not None)
            )
            if not ok:
                raise ManifestError(
                    f"{where}: shape entry {dim!r} is neither a positive int nor one of "
                    f"{', '.join(SYMBOLIC_DIMS)}; {REEXPORT}"
                )
        return cls(name=name, dtype=dtype, shape=list(shape))


@dataclass(frozen=True)
class FileTensor:
    """An input or output as an engine file declares it; a dim is an int, or a str / None when dynamic."""

    name: str
    dtype: str  # "float32", "float16", "bfloat16", or the file's own name of another type ("int64", ...)
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Profile:
    """Optimization profile of an engine: (min, opt, max) of batch, height and width.

    ONNX files accept any shape; the profile there records the range the file
    was verified for and the range its TensorRT engine is (or would be) built for.
    """

    batch: tuple[int, int, int]
    height: tuple[int, int, int]
    width: tuple[int, int, int]

    def __post_init__(self) -> None:
        for axis in ("batch", "height", "width"):
            value = getattr(self, axis)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            ):
                raise ProfileError(f"{axis} range {value!r} must be three integers MIN:OPT:MAX")
            lo, opt, hi = value
            if not 0 < lo <= opt <= hi:
                raise ProfileError(f"{axis} range {lo}:{opt}:{hi} must satisfy 0 < MIN <= OPT <= MAX")
            if hi > PROFILE_LIMITS[axis]:
                raise ProfileError(
                    f"{axis} range {lo}:{opt}:{hi} exceeds the supported maximum {PROFILE_LIMITS[axis]} "
                    f"(lego-export's bound on --{axis} MAX); choose a smaller MAX"
                )
            object.__setattr__(self, axis, (lo, opt, hi))

    def check(self, batch: int, height: int, width: int) -> None:
        """Raise :class:`ProfileError` (a ShapeError) unless every size lies inside its range."""
        bad = [
            f"{axis} {value} not in [{lo}, {hi}]"
            for axis, value, (lo, _, hi) in (
                ("batch", batch, self.batch),
                ("height", height, self.height),
                ("width", width, self.width),
            )
            if not lo <= value <= hi
        ]
        if bad:
            raise ProfileError(
                f"shape batch={batch} height={height} width={width} is outside the engine profile "
                f"({'; '.join(bad)}); supported: {self.describe()}. Re-export with wider "
                "--batch/--height/--width ranges (classifier-free guidance doubles the batch)"
            )

    def describe(self) -> str:
        """Human-readable ranges, e.g. ``batch 1..8 (opt 1), height 4..256 (opt 64), width 4..256 (opt 64)``."""
        return ", ".join(
            f"{axis} {lo}..{hi} (opt {opt})"
            for axis, (lo, opt, hi) in (("batch", self.batch), ("height", self.height), ("width", self.width))
        )

    def to_dict(self) -> dict[str, list[int]]:
        return {"batch": list(self.batch), "height": list(self.height), "width": list(self.width)}

    @classmethod
    def from_dict(cls, d: Any, where: str = "profile") -> Profile:
        d = _exact_keys(d, ("batch", "height", "width"), where)
        try:
            return cls(
                batch=tuple(_require(d, "batch", list, where)),
                height=tuple(_require(d, "height", list, where)),
                width=tuple(_require(d, "width", list, where)),
            )
        except ProfileError as err:
            raise ManifestError(f"{where}: {err}; {REEXPORT}") from None


@dataclass(frozen=True)
class CheckpointRecord:
    """Where the exported weights came from: a checkpoint file, or a replayable random initialisation."""

    path: str | None  # absolute path of the checkpoint file, None for a random init
    sha256: str | None  # of that file, None for a random init
    random_init_seed: int | None  # LegoModel.randomize_ seed, None for a checkpoint file

    @classmethod
    def of_file(cls, path: str | Path) -> CheckpointRecord:
        """The record of a checkpoint file (its absolute path and sha256)."""
        return cls(path=str(Path(path).resolve()), sha256=file_sha256(path), random_init_seed=None)

    @classmethod
    def random_init(cls, seed: int) -> CheckpointRecord:
        """The record of random weights that ``LegoModel(config).randomize_(seed)`` reproduces."""
        return cls(path=None, sha256=None, random_init_seed=seed)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> CheckpointRecord:
        record = _read_flat(cls, d, where)
        is_file = record.path is not None and record.sha256 is not None and record.random_init_seed is None
        is_random = record.path is None and record.sha256 is None and record.random_init_seed is not None
        if not (is_file or is_random):
            raise ManifestError(
                f"{where}: needs either path and sha256 (a checkpoint file) or random_init_seed alone; {REEXPORT}"
            )
        if record.sha256 is not None:
            _check_sha256(record.sha256, where)
        return record


@dataclass(frozen=True)
class BuiltWith:
    """Software (and, for TensorRT plans, the GPU) an engine file was made with.

    The TensorRT fields are None for ONNX files, which are portable, and all
    set for plans, which only run on that TensorRT version and compute capability.
    """

    torch: str
    onnx: str
    onnxruntime: str | None  # None when onnxruntime was not installed
    python: str
    exporter: str  # "dynamo" | "torchscript"
    opset: int
    tensorrt: str | None = None
    gpu: str | None = None  # torch.cuda.get_device_name() of the build GPU
    compute_capability: str | None = None  # "major.minor", e.g. "9.0"
    onnx_sha256: str | None = None  # of the ONNX file the plan was built from
    engine_cache_key: str | None = None

    @classmethod
    def from_dict(cls, d: Any, where: str, format: str) -> BuiltWith:
        built = _read_flat(cls, d, where)
        trt_fields = ("tensorrt", "gpu", "compute_capability", "onnx_sha256", "engine_cache_key")
        given = [name for name in trt_fields if getattr(built, name) is not None]
        if format == "onnx" and given:
            raise ManifestError(f"{where}: an ONNX file has no {given[0]!r}; {REEXPORT}")
        if format == "tensorrt":
            absent = [name for name in trt_fields if name not in given]
            if absent:
                raise ManifestError(f"{where}: a TensorRT plan needs {absent[0]!r}; {REEXPORT}")
            if not re.fullmatch(r"\d+\.\d+", built.compute_capability):
                raise ManifestError(
                    f"{where}: compute_capability {built.compute_capability!r} is not MAJOR.MINOR; {REEXPORT}"
                )
        return built


@dataclass(frozen=True)
class MeasuredError:
    """An engine output against the eager float32 model: max |out - eager|, and that over max |eager|."""

    max_abs: float
    max_rel: float

    @classmethod
    def from_dict(cls, d: Any, where: str) -> MeasuredError:
        return _read_flat(cls, d, where)


@dataclass(frozen=True)
class Verification:
    """How an engine file was checked at export: per shape "BxHxW" its error, the worst of each, the tolerance.

    The reference is always the eager float32 model; the error is relative to
    the output's range (max_rel = max |out - eager| / max |eager|).
    """

    runtime: str  # what ran the file: "onnxruntime-cpu", "onnxruntime-cpu-fp32-emulation", "tensorrt"
    tolerance: float  # largest max_rel accepted
    max_abs: float
    max_rel: float
    shapes: dict[str, MeasuredError]

    @classmethod
    def of(cls, shapes: dict[str, MeasuredError], tolerance: float, runtime: str) -> Verification:
        """The record of per-shape errors: the worst of each measure over the shapes."""
        return cls(
            runtime=runtime,
            tolerance=tolerance,
            max_abs=max((e.max_abs for e in shapes.values()), default=0.0),
            max_rel=max((e.max_rel for e in shapes.values()), default=0.0),
            shapes=dict(shapes),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> Verification:
        d = _exact_keys(d, tuple(f.name for f in dataclasses.fields(cls)), where)
        shapes = _require(d, "shapes", dict, where)
        return cls(
            runtime=_require(d, "runtime", str, where),
            tolerance=_require(d, "tolerance", float, where),
            max_abs=_require(d, "max_abs", float, where),
            max_rel=_require(d, "max_rel", float, where),
            shapes={k: MeasuredError.from_dict(v, f"{where} shape {k}") for k, v in shapes.items()},
        )


# ------------------------------------------------------------------------------- engine contract


def _embedder_io(config: LegoConfig, brick: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec("c_noise", IO_DTYPE, ["B"])]
    if config.label_dim:
        inputs.append(TensorSpec("class_labels", IO_DTYPE, ["B", config.label_dim]))
    return inputs, [TensorSpec("cond", IO_DTYPE, ["B", config.hidden_size])]


def _brick_io(config: LegoConfig, brick: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    C, D = config.img_channels, config.hidden_size
    inputs = [TensorSpec("x_in", IO_DTYPE, ["B", C + 2, "H", "W"])]
    if brick:  # brick 0 has no previous f
        inputs.append(TensorSpec("f_prev", IO_DTYPE, ["B", C, "H", "W"]))
    inputs.append(TensorSpec("cond", IO_DTYPE, ["B", D]))
    return inputs, [TensorSpec("f", IO_DTYPE, ["B", C, "H", "W"])]


def _vae_decoder_io(config: LegoConfig, brick: int | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec("latents", IO_DTYPE, ["B", config.img_channels, "H", "W"])]
    return inputs, [TensorSpec("images", IO_DTYPE, ["B", 3, f"{VAE_UPSCALE}*H", f"{VAE_UPSCALE}*W"])]


# Engine kind -> (config, brick index) -> (inputs, outputs) of the engine contract (shared/DESIGN.md).
# The exporter's specs and the loader's checks both read this table; a new engine kind adds one function.
ENGINE_CONTRACTS: dict[str, Callable[[LegoConfig, int | None], tuple[list[TensorSpec], list[TensorSpec]]]] = {
    "embedder": _embedder_io,
    "brick": _brick_io,
    VAE_ENGINE: _vae_decoder_io,
}
KINDS = tuple(ENGINE_CONTRACTS)


def contract_io(config: LegoConfig, kind: str, brick: int | None = None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(inputs, outputs) that engine ``kind`` (brick index ``brick``) of a ``config`` model must have."""
    return ENGINE_CONTRACTS[kind](config, brick)


def _first_contract_difference(want: list[TensorSpec], got: list[TensorSpec]) -> str | None:
    if [t.name for t in want] != [t.name for t in got]:
        return f"tensors {[t.name for t in got]} where the contract has {[t.name for t in want]}"
    for w, g in zip(want, got):
        if w != g:
            return f"{g.name} {g.dtype} {g.shape} where the contract has {w.dtype} {w.shape}"
    return None


# --------------------------------------------------------------------------------- entries and manifest


@dataclass(frozen=True)
class EngineEntry:
    """One engine file and everything a runtime needs to bind it."""

    name: str  # "embedder", "brick0", "brick1", ...
    kind: str  # "embedder" | "brick"
    brick: int | None  # brick index for kind "brick", None for the embedder
    file: str  # relative to the engine directory, POSIX separators
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profile: Profile
    sha256: str
    bytes: int
    built_with: BuiltWith
    verification: Verification

    def path(self, engine_dir: str | Path) -> Path:
        """Absolute path of the engine file inside ``engine_dir``."""
        return Path(engine_dir) / self.file

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "brick": self.brick,
            "file": self.file,
            "format": self.format,
            "precision": self.precision,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profile": self.profile.to_dict(),
            "sha256": self.sha256,
            "bytes": self.bytes,
            "built_with": dataclasses.asdict(self.built_with),
            "verification": self.verification.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> EngineEntry:
        d = _exact_keys(d, tuple(f.name for f in dataclasses.fields(cls)), where)
        name = _require(d, "name", str, where)
        where = f"{where} ({name})"
        kind = _require(d, "kind", str, where)
        if kind not in KINDS:
            raise ManifestError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}; {REEXPORT}")
        brick = d["brick"]
        if kind == "brick" and (not isinstance(brick, int) or isinstance(brick, bool) or brick < 0):
            raise ManifestError(f"{where}: a brick engine needs a brick index >= 0, got {brick!r}; {REEXPORT}")
        if kind != "brick" and brick is not None:
            raise ManifestError(f"{where}: the {kind} has no brick index, got {brick!r}; {REEXPORT}")
        fmt = _require(d, "format", str, where)
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}; {REEXPORT}")
        precision = _require(d, "precision", str, where)
        if precision not in PRECISIONS:
            raise ManifestError(f"{where}: precision {precision!r} is not one of {', '.join(PRECISIONS)}; {REEXPORT}")
        sha = _check_sha256(_require(d, "sha256", str, where), where)
        size = _require(d, "bytes", int, where)
        return cls(
            name=name,
            kind=kind,
            brick=brick,
            file=_safe_relative(_require(d, "file", str, where), where),
            format=fmt,
            precision=precision,
            inputs=[TensorSpec.from_dict(t, f"{where} input") for t in _require(d, "inputs", list, where)],
            outputs=[TensorSpec.from_dict(t, f"{where} output") for t in _require(d, "outputs", list, where)],
            profile=Profile.from_dict(_require(d, "profile", dict, where), f"{where} profile"),
            sha256=sha,
            bytes=size,
            built_with=BuiltWith.from_dict(d["built_with"], f"{where} built_with", fmt),
            verification=Verification.from_dict(d["verification"], f"{where} verification"),
        )


@dataclass(frozen=True)
class VaeRecord:
    """The autoencoder a ``vae_decoder`` engine was exported from (diffusers ``AutoencoderKL``)."""

    source: str  # the --vae path given to lego-export, resolved
    sha256: str  # of its weights file
    scaling_factor: float  # latents are divided by it inside the engine (0.18215 for sd-vae-ft-ema)
    shift_factor: float | None  # added after the division (None for Stable Diffusion's VAEs)
    latent_channels: int
    block_out_channels: tuple[int, ...]  # the architecture's widths: the runtime sizes its decode chunks by them

    def weights(self) -> CheckpointRecord:
        """The decoder engines' weights, as their identity names them (the VAE's file, not the LEGO checkpoint)."""
        return CheckpointRecord(path=self.source, sha256=self.sha256, random_init_seed=None)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "block_out_channels": list(self.block_out_channels)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> VaeRecord:
        d = _exact_keys(d, tuple(f.name for f in dataclasses.fields(cls)), where)
        channels = _require(d, "block_out_channels", list, where)
        if not channels or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
            raise ManifestError(f"{where}: block_out_channels {channels!r} must be positive ints; {REEXPORT}")
        scale = _require(d, "scaling_factor", float, where)
        if not (math.isfinite(scale) and scale > 0):
            raise ManifestError(f"{where}: scaling_factor must be positive, got {scale!r}; {REEXPORT}")
        return cls(
            source=_require(d, "source", str, where),
            sha256=_check_sha256(_require(d, "sha256", str, where), where),
            scaling_factor=scale,
            shift_factor=_require(d, "shift_factor", (float, type(None)), where),
            latent_channels=_require(d, "latent_channels", int, where),
            block_out_channels=tuple(channels),
        )


@dataclass(frozen=True)
class Manifest:
    """Contents of manifest.json: model config, checkpoint identity and the engines."""

    config: LegoConfig
    checkpoint: CheckpointRecord
    engines: list[EngineEntry]
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    schema_version: int = SCHEMA_VERSION
    vae: VaeRecord | None = None  # the autoencoder of the vae_decoder engines; None without them

    def engines_for(self, format: str) -> dict[str, EngineEntry]:
        """The denoiser's engines (embedder, bricks) of one format by name; empty when the directory has none."""
        if format not in FORMATS:
            raise ManifestError(f"unknown engine format {format!r}; valid formats: {', '.join(FORMATS)}")
        return {e.name: e for e in self.engines if e.format == format and e.kind != VAE_ENGINE}

    def decoder_for(self, format: str) -> EngineEntry | None:
        """The ``vae_decoder`` engine of one format, or None when the directory has none."""
        if format not in FORMATS:
            raise ManifestError(f"unknown engine format {format!r}; valid formats: {', '.join(FORMATS)}")
        return next((e for e in self.engines if e.format == format and e.kind == VAE_ENGINE), None)

    def formats(self) -> list[str]:
        """Formats present in this directory, in FORMATS order."""
        return [f for f in FORMATS if any(e.format == f for e in self.engines)]

    def to_dict(self) -> dict[str, Any]:
        out = {
            "schema_version": self.schema_version,
            "config": self.config.to_dict(),
            "checkpoint": dataclasses.asdict(self.checkpoint),
            "created": self.created,
            "engines": [e.to_dict() for e in self.engines],
        }
        if self.vae is not None:  # absent, not null, in directories without a decoder
            out["vae"] = self.vae.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Validate the structure of a parsed manifest (files are checked by :func:`load_manifest`)."""
        d = _require_dict(d, where)
        version = d.get("schema_version")
        if isinstance(version, int) and not isinstance(version, bool) and 0 < version < SCHEMA_VERSION:
            raise ManifestError(
                f"{where} was written by an older lego-export (schema version {version}, this toolchain reads "
                f"{SCHEMA_VERSION}); {REEXPORT}"
            )
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where} has schema version {version!r}, this toolchain reads version {SCHEMA_VERSION}; {REEXPORT}"
            )
        keys = ("schema_version", "config", "checkpoint", "created", "engines")
        d = _exact_keys(d, (*keys, "vae") if "vae" in d else keys, where)
        try:
            config = LegoConfig.from_dict(_require(d, "config", dict, where))
        except ConfigError as err:
            raise ManifestError(f"{where}: invalid model config ({err}); {REEXPORT}") from None
        checkpoint = CheckpointRecord.from_dict(d["checkpoint"], f"{where} checkpoint")
        created = _require(d, "created", str, where)
        raw = _require(d, "engines", list, where)
        engines = [EngineEntry.from_dict(e, f"{where} engine {i}") for i, e in enumerate(raw)]
        seen: set[tuple[str, str]] = set()
        for e in engines:
            if (e.name, e.format) in seen:
                raise ManifestError(f"{where}: engine {e.name!r} ({e.format}) is listed twice; {REEXPORT}")
            seen.add((e.name, e.format))
            if e.kind == "brick" and (e.brick >= config.num_bricks or e.name != f"brick{e.brick}"):
                raise ManifestError(
                    f"{where}: engine {e.name!r} claims brick {e.brick} of a {config.num_bricks}-brick model; "
                    f"{REEXPORT}"
                )
            if e.kind == "embedder" and e.name != "embedder":
                raise ManifestError(f"{where}: the embedder engine must be named 'embedder', got {e.name!r}")
            if e.kind == VAE_ENGINE and e.name != VAE_ENGINE:
                raise ManifestError(f"{where}: the VAE decoder engine must be named {VAE_ENGINE!r}, got {e.name!r}")
            for role, want, got in zip(
                ("inputs", "outputs"), contract_io(config, e.kind, e.brick), (e.inputs, e.outputs)
            ):
                difference = _first_contract_difference(want, got)
                if difference:
                    raise ManifestError(
                        f"{where}: engine {e.name!r} ({e.format}) {role} do not fit the manifest's config "
                        f"{config.name} (img_channels {config.img_channels}, hidden_size {config.hidden_size}, "
                        f"label_dim {config.label_dim}): {difference}; {REEXPORT}"
                    )
        onnx_sha = {e.name: e.sha256 for e in engines if e.format == "onnx"}
        for e in engines:
            source = e.built_with.onnx_sha256
            if e.format == "tensorrt" and e.name in onnx_sha and source != onnx_sha[e.name]:
                raise ManifestError(
                    f"{where}: TensorRT plan {e.name!r} was built from another ONNX file than the directory's "
                    f"{e.name} (onnx_sha256 differs); {REEXPORT}"
                )
        vae = VaeRecord.from_dict(d["vae"], f"{where} vae") if "vae" in d else None
        if (vae is None) != all(e.kind != VAE_ENGINE for e in engines):
            raise ManifestError(f"{where}: a vae_decoder engine needs a 'vae' record and vice versa; {REEXPORT}")
        return cls(
            config=config, checkpoint=checkpoint, engines=engines, created=created, schema_version=version, vae=vae
        )


# ---------------------------------------------------------------------------------- reading JSON


def _require_dict(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}; {REEXPORT}")
    return d


def _exact_keys(d: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """``d`` as a dict with exactly ``keys``: lego-export writes every field, in one spelling."""
    d = _require_dict(d, where)
    missing = [k for k in keys if k not in d]
    if missing:
        raise ManifestError(f"{where}: required field {missing[0]!r} is missing; {REEXPORT}")
    unknown = [k for k in d if k not in keys]
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r}; {REEXPORT}")
    return d


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``d[key]``, refused unless it is of ``kind`` (bool is no int; an int is a valid float, as in JSON)."""
    if key not in d:
        raise ManifestError(f"{where}: required field {key!r} is missing; {REEXPORT}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    accepted = (*kinds, int) if float in kinds else kinds
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ManifestError(f"{where}: field {key!r} should be {names}, got {_json_type(value)}; {REEXPORT}")
    if float in kinds and isinstance(value, (int, float)) and not math.isfinite(value):
        raise ManifestError(f"{where}: field {key!r} is {value}, expected a finite number; {REEXPORT}")
    return float(value) if float in kinds and isinstance(value, int) else value


def _read_flat(cls: type, d: Any, where: str) -> Any:
    """An instance of dataclass ``cls`` whose fields are str, int, float or X | None, read with exact keys."""
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    d = _exact_keys(d, names, where)
    values = {}
    for name in names:
        hint = hints[name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        values[name] = _require(d, name, kinds, where)
    return cls(**values)


def _json_type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_sha256(sha: str, where: str) -> str:
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ManifestError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits; {REEXPORT}")
    return sha


def _safe_relative(file: str, where: str) -> str:
    """Refuse absolute paths, drive letters, backslashes and any ``..`` component."""
    p = PurePosixPath(file)
    if not file or p.is_absolute() or "\\" in file or ":" in file or any(part in ("..", "") for part in p.parts):
        raise ManifestError(
            f"{where}: file {file!r} must be a plain relative path inside the engine directory; refusing it "
            f"({REEXPORT})"
        )
    if not p.parts or p.parts == (".",):
        raise ManifestError(f"{where}: file {file!r} names the directory itself, not a file")
    return p.as_posix()
