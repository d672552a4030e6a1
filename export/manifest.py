"""manifest.json of an engine directory: what the runtimes need, without importing the export code.

An engine directory holds one file per engine (``embedder``, ``brick0``,
``brick1``, ... as ONNX and/or TensorRT plan) and ``manifest.json``:

    {"schema_version": 2, "config": {...LegoConfig...},
     "checkpoint": {"path": ..., "sha256": ..., "random_init_seed": ...},
     "created": "2026-01-01T00:00:00+00:00",
     "engines": [{"name": "brick0", "kind": "brick", "brick": 0, "file": "brick0.onnx",
                  "format": "onnx", "precision": "fp32",
                  "inputs": [{"name": "x_in", "dtype": "float32", "shape": ["B", 5, "H", "W"]}, ...],
                  "outputs": [...], "profile": {"batch": [1, 1, 8], "height": [...], "width": [...]},
                  "sha256": "...", "bytes": 123, "built_with": {...BuiltWith...},
                  "verification": {...Verification...}}, ...]}

Every record is a frozen dataclass read with exact keys: only lego-export
writes manifests, in one spelling, so a missing, unknown or mistyped field
means the directory was not written by this toolchain's exporter.
:func:`load_manifest` is the only way the runtimes read a directory: it
checks the schema version, every field, that every file stays inside the
directory, exists and has the recorded sha256, and that every file is the
engine its entry says it is: an ONNX file carries identity metadata props
(:func:`engine_identity`: engine name, kind, brick, precision, fingerprints of
the model config and the checkpoint, written by lego-export before the file is
hashed) and graph inputs/outputs that must equal the entry's, and the entry's
I/O must be the engine contract of the manifest's config
(:func:`contract_io`).  A file copied into another engine's slot, or a config
that disagrees with the files, is refused before any session is created.
TensorRT plans are opaque here: the TensorRT backend compares their I/O
(:func:`check_engine_io`) and the identity lego-export gives their network
name (:func:`plan_name`, :func:`check_plan_identity`) when it deserializes
them.  Each refusal is one :class:`ManifestError` line that says what to do.

A latent model's directory may add a ``vae_decoder`` engine (latents ->
images, 8x each side) and a top-level ``"vae"`` record of the autoencoder it
was exported from (:class:`VaeRecord`: source path, weights sha256, scaling
factor); the key is absent in directories without a decoder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import mmap
import os
import re
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from export.errors import ManifestError, ProfileError
from lego_model.checkpoints import file_sha256
from lego_model.configs import LegoConfig
from lego_model.errors import ConfigError

__all__ = [
    "DTYPES",
    "FORMATS",
    "IO_DTYPE",
    "MANIFEST_NAME",
    "PRECISIONS",
    "PRECISION_DTYPES",
    "PROFILE_LIMITS",
    "SCHEMA_VERSION",
    "SYMBOLIC_DIMS",
    "TORCH_DTYPES",
    "BuiltWith",
    "CheckpointRecord",
    "EngineEntry",
    "FileTensor",
    "Manifest",
    "ManifestError",
    "MeasuredError",
    "Profile",
    "ProfileError",
    "TensorSpec",
    "VaeRecord",
    "Verification",
    "check_engine_io",
    "check_identity",
    "check_onnx_identity",
    "check_plan_identity",
    "config_fingerprint",
    "contract_io",
    "engine_identity",
    "entry_identity",
    "file_sha256",
    "load_manifest",
    "onnx_declaration",
    "plan_name",
    "read_manifest_json",
    "write_manifest",
]

# 2: checkpoint, built_with and verification became exact records (1 had free-form dicts).
SCHEMA_VERSION = 2
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "tensorrt")
# Engine precision (what --precision says) -> the dtype name its half-precision weights and casts use.
PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PRECISIONS = tuple(PRECISION_DTYPES)
# Tensor dtype names of the manifest -> torch dtypes (the runtimes' buffers, the exporter's casts).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPES = tuple(TORCH_DTYPES)
SYMBOLIC_DIMS = ("B", "H", "W")
VAE_ENGINE = "vae_decoder"
VAE_UPSCALE = 8  # image side per latent side of the Stable Diffusion VAE (the contract's 8h x 8w)
# The decoder's output sides are multiples of its input sides: "8*H", "8*W" (the ONNX files' own dim names).
_SCALED_DIM = re.compile(r"^[1-9][0-9]*\*[HW]$")
# Engine I/O is float32 at every precision (export/specs.py says why).
IO_DTYPE = "float32"
# Largest MAX of a profile range lego-export writes and the runtimes accept.  A TensorRT engine sizes its
# scratch memory for the profile's largest shape, and the runtimes allocate it once at load: a batch of
# 999999999 or a 100000-pixel side would be recorded as a promise no GPU keeps (and try to allocate it).
PROFILE_LIMITS = {"batch": 4096, "height": 8192, "width": 8192}
# manifest.json is a few KB per engine; anything near this is not one of ours.
MAX_MANIFEST_BYTES = 16 << 20

_REEXPORT = "re-run lego-export --force"


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
            raise ManifestError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}; {_REEXPORT}")
        shape = _require(d, "shape", list, where)
        for dim in shape:
            ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0) or (
                isinstance(dim, str) and (dim in SYMBOLIC_DIMS or _SCALED_DIM.match(dim) is not None)
            )
            if not ok:
                raise ManifestError(
                    f"{where}: shape entry {dim!r} is neither a positive int nor one of "
                    f"{', '.join(SYMBOLIC_DIMS)}; {_REEXPORT}"
                )
        return cls(name=name, dtype=dtype, shape=list(shape))


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
            raise ManifestError(f"{where}: {err}; {_REEXPORT}") from None


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
                f"{where}: needs either path and sha256 (a checkpoint file) or random_init_seed alone; {_REEXPORT}"
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
            raise ManifestError(f"{where}: an ONNX file has no {given[0]!r}; {_REEXPORT}")
        if format == "tensorrt":
            absent = [name for name in trt_fields if name not in given]
            if absent:
                raise ManifestError(f"{where}: a TensorRT plan needs {absent[0]!r}; {_REEXPORT}")
            if not re.fullmatch(r"\d+\.\d+", built.compute_capability):
                raise ManifestError(
                    f"{where}: compute_capability {built.compute_capability!r} is not MAJOR.MINOR; {_REEXPORT}"
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


# ------------------------------------------------------------------------- engine contract and identity


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


def config_fingerprint(config: LegoConfig) -> str:
    """sha256 of the config's canonical JSON: which model an engine file belongs to."""
    return hashlib.sha256(config.to_json().encode()).hexdigest()


def engine_identity(
    name: str, kind: str, brick: int | None, precision: str, config: LegoConfig, checkpoint: CheckpointRecord
) -> dict[str, str]:
    """The ONNX metadata props that say which engine of which model a file is.

    lego-export writes them into each ONNX file before hashing it; :func:`load_manifest`
    compares them with the file's manifest entry, so a file copied into another
    engine's slot (with its hash fixed in the manifest) is refused.  The checkpoint
    is named by its sha256 (not its path) or random-init seed, so the same model
    exported twice gives the same bytes (and the same TensorRT engine-cache key).
    """
    weights = f"sha256:{checkpoint.sha256}" if checkpoint.sha256 else f"random_init_seed:{checkpoint.random_init_seed}"
    return {
        "lego.engine": name,
        "lego.kind": kind,
        "lego.brick": "" if brick is None else str(brick),
        "lego.precision": precision,
        "lego.config_sha256": config_fingerprint(config),
        "lego.checkpoint": weights,
    }


_IDENTITY_LABELS = {
    "lego.engine": "engine",
    "lego.kind": "engine kind",
    "lego.brick": "brick index",
    "lego.precision": "precision",
    "lego.config_sha256": "model config fingerprint",
    "lego.checkpoint": "weights",
}


@dataclass(frozen=True)
class FileTensor:
    """An input or output as an engine file declares it; a dim is an int, or a str / None when dynamic."""

    name: str
    dtype: str  # "float32", "float16", "bfloat16", or the file's own name of another type ("int64", ...)
    shape: tuple[int | str | None, ...]


def check_engine_io(
    where: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    file_inputs: list[FileTensor],
    file_outputs: list[FileTensor],
) -> None:
    """Refuse an engine file whose declared I/O differs from its manifest entry's, naming the first difference.

    Compared: the set of names, and per tensor the dtype, the rank and every
    dim (a symbolic "B"/"H"/"W" of the entry must be dynamic in the file, a
    number must be that number: channels C+2 and C, hidden size D, label_dim).
    Pure, so that the TensorRT backend's plan descriptions are checked by the
    same code that the CPU tests exercise.
    """
    fix = f"the file belongs to another engine or model; {_REEXPORT}"
    for role, want, got in (("input", inputs, file_inputs), ("output", outputs, file_outputs)):
        want_names, got_names = [t.name for t in want], [t.name for t in got]
        if sorted(want_names) != sorted(got_names):
            raise ManifestError(f"{where}: the file has {role}s {got_names}, the manifest says {want_names}; {fix}")
        declared = {t.name: t for t in got}
        for spec in want:
            t = declared[spec.name]
            if t.dtype != spec.dtype:
                raise ManifestError(
                    f"{where}: {role} {spec.name!r} is {t.dtype} in the file, {spec.dtype} in the manifest; {fix}"
                )
            if len(t.shape) != len(spec.shape):
                raise ManifestError(
                    f"{where}: {role} {spec.name!r} has rank {len(t.shape)} in the file, {len(spec.shape)} "
                    f"({spec.shape}) in the manifest; {fix}"
                )
            for i, (have, need) in enumerate(zip(t.shape, spec.shape)):
                dynamic = not isinstance(have, int) or have < 0
                if (isinstance(need, str) and not dynamic) or (isinstance(need, int) and have != need):
                    shown = "dynamic" if dynamic else have
                    raise ManifestError(
                        f"{where}: {role} {spec.name!r} dim {i} is {shown} in the file, {need} in the manifest "
                        f"(shape {spec.shape}); {fix}"
                    )


def _first_contract_difference(want: list[TensorSpec], got: list[TensorSpec]) -> str | None:
    if [t.name for t in want] != [t.name for t in got]:
        return f"tensors {[t.name for t in got]} where the contract has {[t.name for t in want]}"
    for w, g in zip(want, got):
        if w != g:
            return f"{g.name} {g.dtype} {g.shape} where the contract has {w.dtype} {w.shape}"
    return None


@dataclass(frozen=True)
class EngineEntry:
    """One engine file and everything a runtime needs to bind it."""

    name: str  # "embedder", "brick0", "brick1", ...
    kind: str  # "embedder" | "brick"
    brick: int | None  # brick index for kind "brick", None for the embedder
    file: str  # relative to the engine directory, POSIX separators
    format: str  # "onnx" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "bf16"
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
            raise ManifestError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}; {_REEXPORT}")
        brick = d["brick"]
        if kind == "brick" and (not isinstance(brick, int) or isinstance(brick, bool) or brick < 0):
            raise ManifestError(f"{where}: a brick engine needs a brick index >= 0, got {brick!r}; {_REEXPORT}")
        if kind != "brick" and brick is not None:
            raise ManifestError(f"{where}: the {kind} has no brick index, got {brick!r}; {_REEXPORT}")
        fmt = _require(d, "format", str, where)
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}; {_REEXPORT}")
        precision = _require(d, "precision", str, where)
        if precision not in PRECISIONS:
            raise ManifestError(f"{where}: precision {precision!r} is not one of {', '.join(PRECISIONS)}; {_REEXPORT}")
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
            raise ManifestError(f"{where}: block_out_channels {channels!r} must be positive ints; {_REEXPORT}")
        scale = _require(d, "scaling_factor", float, where)
        if not (math.isfinite(scale) and scale > 0):
            raise ManifestError(f"{where}: scaling_factor must be positive, got {scale!r}; {_REEXPORT}")
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
                f"{SCHEMA_VERSION}); {_REEXPORT}"
            )
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where} has schema version {version!r}, this toolchain reads version {SCHEMA_VERSION}; {_REEXPORT}"
            )
        keys = ("schema_version", "config", "checkpoint", "created", "engines")
        d = _exact_keys(d, (*keys, "vae") if "vae" in d else keys, where)
        try:
            config = LegoConfig.from_dict(_require(d, "config", dict, where))
        except ConfigError as err:
            raise ManifestError(f"{where}: invalid model config ({err}); {_REEXPORT}") from None
        checkpoint = CheckpointRecord.from_dict(d["checkpoint"], f"{where} checkpoint")
        created = _require(d, "created", str, where)
        raw = _require(d, "engines", list, where)
        engines = [EngineEntry.from_dict(e, f"{where} engine {i}") for i, e in enumerate(raw)]
        seen: set[tuple[str, str]] = set()
        for e in engines:
            if (e.name, e.format) in seen:
                raise ManifestError(f"{where}: engine {e.name!r} ({e.format}) is listed twice; {_REEXPORT}")
            seen.add((e.name, e.format))
            if e.kind == "brick" and (e.brick >= config.num_bricks or e.name != f"brick{e.brick}"):
                raise ManifestError(
                    f"{where}: engine {e.name!r} claims brick {e.brick} of a {config.num_bricks}-brick model; "
                    f"{_REEXPORT}"
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
                        f"label_dim {config.label_dim}): {difference}; {_REEXPORT}"
                    )
        onnx_sha = {e.name: e.sha256 for e in engines if e.format == "onnx"}
        for e in engines:
            source = e.built_with.onnx_sha256
            if e.format == "tensorrt" and e.name in onnx_sha and source != onnx_sha[e.name]:
                raise ManifestError(
                    f"{where}: TensorRT plan {e.name!r} was built from another ONNX file than the directory's "
                    f"{e.name} (onnx_sha256 differs); {_REEXPORT}"
                )
        vae = VaeRecord.from_dict(d["vae"], f"{where} vae") if "vae" in d else None
        if (vae is None) != all(e.kind != VAE_ENGINE for e in engines):
            raise ManifestError(f"{where}: a vae_decoder engine needs a 'vae' record and vice versa; {_REEXPORT}")
        return cls(
            config=config, checkpoint=checkpoint, engines=engines, created=created, schema_version=version, vae=vae
        )


def load_manifest(engine_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and validate ``engine_dir/manifest.json`` and every file it lists.

    Refuses (with one-line :class:`ManifestError`) a missing directory or
    manifest, corrupt, oversized or absurdly nested JSON, an unknown schema
    version, missing or malformed fields, engine I/O that does not fit the
    config, a file path that is absolute or leaves the directory, a missing
    file, a file whose size or sha256 differs from the manifest, and an ONNX
    file whose identity metadata or declared I/O is not its entry's (each
    ONNX file is read once: hashed and parsed from the same bytes).
    ``verify_hashes=False`` skips only the hashes.
    """
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise ManifestError(
            f"engine directory {engine_dir} does not exist; create it with lego-export --out {engine_dir}"
        )
    if not path.is_file():
        raise ManifestError(f"{engine_dir} has no {MANIFEST_NAME}; export into it with lego-export --out {engine_dir}")
    data = read_manifest_json(path)
    manifest = Manifest.from_dict(data, where=str(path))
    root = engine_dir.resolve()
    for e in manifest.engines:
        target = (engine_dir / e.file).resolve()
        # A symlink inside the directory could still point outside it.
        if not target.is_relative_to(root):
            raise ManifestError(f"{path}: engine {e.name!r} file {e.file!r} resolves outside {engine_dir}; refusing it")
        if not target.is_file():
            raise ManifestError(f"{path}: engine file {e.file} is missing; {_REEXPORT}")
        where = f"{engine_dir / e.file} (engine {e.name})"
        if e.format == "onnx":
            with _mapped(target) as content:  # read once: hashed and its declaration cut out of the same pages
                if verify_hashes:
                    _check_hash(e, len(content), hashlib.sha256(content).hexdigest(), engine_dir)
                check_onnx_identity(content, e, manifest, where)
        elif verify_hashes:
            _check_hash(e, target.stat().st_size, file_sha256(target), engine_dir)
    return manifest


def read_manifest_json(path: Path) -> Any:
    """The parsed JSON of a manifest file; one-line :class:`ManifestError` for anything that is not one."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} is {size} bytes, no manifest.json lego-export writes is over {MAX_MANIFEST_BYTES}; {_REEXPORT}"
            )
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, and ints beyond Python's digit limit
        raise ManifestError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); {_REEXPORT}") from None
    except RecursionError:
        raise ManifestError(f"{path} is nested too deeply to be a manifest; {_REEXPORT}") from None
    except OSError as err:
        raise ManifestError(f"{path} cannot be read ({err.strerror or err}); check its permissions") from None


@contextlib.contextmanager
def _mapped(path: Path) -> Iterator[Any]:
    """The file's bytes as a read-only mmap (b"" when empty): pages are read once and never copied."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield b""
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            yield mapped


def _check_hash(entry: EngineEntry, size: int, sha: str, engine_dir: Path) -> None:
    if size != entry.bytes or sha != entry.sha256:
        raise ManifestError(
            f"{engine_dir / entry.file} does not match its sha256 in {MANIFEST_NAME} (modified or truncated); "
            f"{_REEXPORT}"
        )


# ONNX TensorProto element types of the engine I/O dtypes (TensorProto.FLOAT, FLOAT16, BFLOAT16).
_ONNX_DTYPE_NAMES = {1: "float32", 10: "float16", 16: "bfloat16"}


def onnx_declaration(content: Any, where: str) -> tuple[dict[str, str], list[FileTensor], list[FileTensor]]:
    """(metadata props, inputs, outputs) an ONNX file declares, read from its bytes (any buffer, e.g. an mmap).

    Only the small messages are parsed: the ModelProto's metadata props and the
    graph's inputs and outputs are cut out of the protobuf wire format, every
    other field (the weights above all) is stepped over by its length without
    being copied, so a 1 GB brick costs a few thousand field headers.
    """
    import onnx  # here, not at the top: reading a manifest of TensorRT plans needs no onnx
    from google.protobuf.message import DecodeError

    props: dict[str, str] = {}
    values: dict[int, list[Any]] = {_GRAPH_INPUT: [], _GRAPH_OUTPUT: []}
    initializers: set[str] = set()  # IR < 4 lists weights among the inputs
    problem = None
    # Views released on the way out, error or not: the caller's mmap can only close without live exports.
    with memoryview(content) as view, view.cast("B") as buf:
        try:
            for number, a, b in _fields(buf, 0, len(buf)):
                if number == _MODEL_METADATA_PROPS:
                    entry = onnx.StringStringEntryProto.FromString(bytes(buf[a:b]))
                    props[entry.key] = entry.value
                elif number == _MODEL_GRAPH:
                    for field_number, c, d in _fields(buf, a, b):
                        if field_number in values:
                            values[field_number].append(onnx.ValueInfoProto.FromString(bytes(buf[c:d])))
                        elif field_number == _GRAPH_INITIALIZER:
                            names = (bytes(buf[e:f]).decode() for n, e, f in _fields(buf, c, d) if n == _TENSOR_NAME)
                            initializers.update(names)
        except (DecodeError, ValueError, RuntimeError) as err:  # UnicodeDecodeError is a ValueError
            problem = str(err)
    if problem is not None:
        raise ManifestError(f"{where} is not an ONNX file ({problem}); {_REEXPORT}")

    def tensors(declared: list[Any]) -> list[FileTensor]:
        out = []
        for v in declared:
            if v.name in initializers:
                continue
            if v.type.WhichOneof("value") != "tensor_type":
                out.append(FileTensor(v.name, "non-tensor", ()))
                continue
            elem = v.type.tensor_type.elem_type
            try:
                dtype = _ONNX_DTYPE_NAMES.get(elem) or onnx.TensorProto.DataType.Name(elem).lower()
            except ValueError:
                dtype = f"onnx type {elem}"
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim
            )
            out.append(FileTensor(v.name, dtype, dims))
        return out

    return props, tensors(values[_GRAPH_INPUT]), tensors(values[_GRAPH_OUTPUT])


# Field numbers of onnx.proto (ModelProto.graph, .metadata_props; GraphProto.initializer, .input, .output;
# TensorProto.name): stable since ONNX 1.0.
_MODEL_GRAPH, _MODEL_METADATA_PROPS = 7, 14
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME = 8


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the protobuf message in ``buf[start:end]``.

    Fields of the other wire types (varints, fixed 32/64) are stepped over.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
            continue
        if wire == 2:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        elif wire in (1, 5):
            stop = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unknown protobuf wire type {wire} at byte {pos}")
        if stop > end:
            raise ValueError(f"field {number} runs past the end of its message (truncated file?)")
        if wire == 2:
            yield number, pos, stop
        pos = stop


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"malformed protobuf varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def check_onnx_identity(content: bytes, entry: EngineEntry, manifest: Manifest, where: str) -> None:
    """Refuse an ONNX file that is not ``entry``'s engine of ``manifest``'s model, or whose I/O is not the entry's."""
    props, inputs, outputs = onnx_declaration(content, where)
    want = entry_identity(entry, manifest)
    if not any(key in props for key in want):
        raise ManifestError(
            f"{where} carries no lego-export identity metadata (written by an older lego-export or another tool); "
            f"{_REEXPORT}"
        )
    check_identity(where, props, want)
    check_engine_io(where, entry.inputs, entry.outputs, inputs, outputs)


def entry_identity(entry: EngineEntry, manifest: Manifest) -> dict[str, str]:
    """:func:`engine_identity` of a manifest entry: what its file must say about itself."""
    weights = manifest.vae.weights() if entry.kind == VAE_ENGINE and manifest.vae else manifest.checkpoint
    return engine_identity(entry.name, entry.kind, entry.brick, entry.precision, manifest.config, weights)


def check_identity(where: str, found: dict[str, str], want: dict[str, str]) -> None:
    """Refuse identity metadata ``found`` in a file that differs from ``want``, naming the first difference."""
    for key, value in want.items():
        have = found.get(key)
        if have != value:
            raise ManifestError(
                f"{where}: the file says {_IDENTITY_LABELS[key]} {have!r}, the manifest's {want['lego.engine']} "
                f"entry needs {value!r} (a file of another engine or export in this slot); {_REEXPORT}"
            )


_PLAN_NAME_PREFIX = "lego-identity:"


def plan_name(identity: dict[str, str]) -> str:
    """The TensorRT network name that carries an engine's identity into its plan (``ICudaEngine.name``)."""
    return _PLAN_NAME_PREFIX + json.dumps(identity, sort_keys=True, separators=(",", ":"))


def check_plan_identity(where: str, name: str | None, want: dict[str, str]) -> str | None:
    """Refuse a TensorRT plan whose network name holds another engine's identity; returns a warning, or None.

    A plan without one (built by an older lego-export) cannot be checked
    beyond its I/O: that is a warning, not a refusal.
    """
    if not name or not name.startswith(_PLAN_NAME_PREFIX):
        return f"{where} carries no identity (built by an older lego-export); rebuild with lego-export --force"
    try:
        found = json.loads(name[len(_PLAN_NAME_PREFIX) :])
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ManifestError(f"{where}: its identity {name[:80]!r} is unreadable; {_REEXPORT}")
    check_identity(where, found, want)
    return None


def write_manifest(manifest: Manifest, engine_dir: str | Path) -> Path:
    """Write ``engine_dir/manifest.json`` (via a temporary file and a rename); returns its path."""
    # Round-trip through the validator so that a writer bug cannot produce a directory the loader refuses.
    Manifest.from_dict(json.loads(manifest.to_json()), where="manifest being written")
    path = Path(engine_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _require_dict(d: Any, where: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(d).__name__}; {_REEXPORT}")
    return d


def _exact_keys(d: Any, keys: tuple[str, ...], where: str) -> dict[str, Any]:
    """``d`` as a dict with exactly ``keys``: lego-export writes every field, in one spelling."""
    d = _require_dict(d, where)
    missing = [k for k in keys if k not in d]
    if missing:
        raise ManifestError(f"{where}: required field {missing[0]!r} is missing; {_REEXPORT}")
    unknown = [k for k in d if k not in keys]
    if unknown:
        raise ManifestError(f"{where}: unknown field {unknown[0]!r}; {_REEXPORT}")
    return d


def _require(d: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``d[key]``, refused unless it is of ``kind`` (bool is no int; an int is a valid float, as in JSON)."""
    if key not in d:
        raise ManifestError(f"{where}: required field {key!r} is missing; {_REEXPORT}")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    accepted = (*kinds, int) if float in kinds else kinds
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ManifestError(f"{where}: field {key!r} should be {names}, got {_json_type(value)}; {_REEXPORT}")
    if float in kinds and isinstance(value, (int, float)) and not math.isfinite(value):
        raise ManifestError(f"{where}: field {key!r} is {value}, expected a finite number; {_REEXPORT}")
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
        raise ManifestError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits; {_REEXPORT}")
    return sha


def _safe_relative(file: str, where: str) -> str:
    """Refuse absolute paths, drive letters, backslashes and any ``..`` component."""
    p = PurePosixPath(file)
    if not file or p.is_absolute() or "\\" in file or ":" in file or any(part in ("..", "") for part in p.parts):
        raise ManifestError(
            f"{where}: file {file!r} must be a plain relative path inside the engine directory; refusing it "
            f"({_REEXPORT})"
        )
    if not p.parts or p.parts == (".",):
        raise ManifestError(f"{where}: file {file!r} names the directory itself, not a file")
    return p.as_posix()
