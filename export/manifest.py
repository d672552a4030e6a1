"""manifest.json of an engine directory: what the runtimes need, without importing the export code.

An engine directory holds one file per engine (``embedder``, ``brick0``,
``brick1``, ... as ONNX and/or TensorRT plan) and ``manifest.json``:

    {"schema_version": 1, "config": {...LegoConfig...},
     "checkpoint": {"path": ..., "sha256": ..., "random_init_seed": ...},
     "created": "2026-01-01T00:00:00+00:00",
     "engines": [{"name": "brick0", "kind": "brick", "brick": 0, "file": "brick0.onnx",
                  "format": "onnx", "precision": "fp32",
                  "inputs": [{"name": "x_in", "dtype": "float32", "shape": ["B", 5, "H", "W"]}, ...],
                  "outputs": [...], "profile": {"batch": [1, 1, 8], "height": [...], "width": [...]},
                  "sha256": "...", "bytes": 123, "built_with": {...}, "verification": {...}}, ...]}

:func:`load_manifest` is the only way the runtimes read a directory: it
checks the schema version, every required field, that every file stays inside
the directory, exists and has the recorded sha256.  Each refusal is one
:class:`ManifestError` line that says what to do.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from export.errors import ManifestError, ProfileError
from lego_model.checkpoints import file_sha256
from lego_model.configs import LegoConfig
from lego_model.errors import ConfigError

__all__ = [
    "DTYPES",
    "FORMATS",
    "MANIFEST_NAME",
    "PRECISIONS",
    "SCHEMA_VERSION",
    "SYMBOLIC_DIMS",
    "EngineEntry",
    "Manifest",
    "ManifestError",
    "Profile",
    "ProfileError",
    "TensorSpec",
    "file_sha256",
    "load_manifest",
    "write_manifest",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16")
DTYPES = ("float32", "float16", "bfloat16")
KINDS = ("embedder", "brick")
SYMBOLIC_DIMS = ("B", "H", "W")

_REEXPORT = "re-export with lego-export --force"


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output: name, dtype and shape with symbolic "B", "H", "W" dimensions."""

    name: str
    dtype: str  # "float32" | "float16" | "bfloat16"
    shape: list[int | str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        d = _require_dict(d, where)
        name = _require(d, "name", str, where)
        dtype = _require(d, "dtype", str, where)
        if dtype not in DTYPES:
            raise ManifestError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}; {_REEXPORT}")
        shape = _require(d, "shape", list, where)
        for dim in shape:
            ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0) or dim in SYMBOLIC_DIMS
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

    def contains(self, batch: int, height: int, width: int) -> bool:
        """Whether (batch, height, width) lies inside every range."""
        try:
            self.check(batch, height, width)
        except ProfileError:
            return False
        return True

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
        d = _require_dict(d, where)
        try:
            return cls(
                batch=tuple(_require(d, "batch", list, where)),
                height=tuple(_require(d, "height", list, where)),
                width=tuple(_require(d, "width", list, where)),
            )
        except ProfileError as err:
            raise ManifestError(f"{where}: {err}; {_REEXPORT}") from None


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
    # versions ("torch", "onnx", "onnxruntime", "tensorrt": str|None), "exporter", "opset", "gpu" (name|None),
    # "compute_capability" ("major.minor", e.g. "9.0", or None for ONNX files)
    built_with: dict[str, Any] = field(default_factory=dict)
    # "runtime", "tolerance", worst "max_abs"/"max_rel", and per shape "BxHxW": {"max_abs", "max_rel"} vs eager
    verification: dict[str, Any] = field(default_factory=dict)

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
            "built_with": dict(self.built_with),
            "verification": dict(self.verification),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> EngineEntry:
        d = _require_dict(d, where)
        name = _require(d, "name", str, where)
        where = f"{where} ({name})"
        kind = _require(d, "kind", str, where)
        if kind not in KINDS:
            raise ManifestError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}; {_REEXPORT}")
        brick = d.get("brick")
        if kind == "brick" and (not isinstance(brick, int) or isinstance(brick, bool) or brick < 0):
            raise ManifestError(f"{where}: a brick engine needs a brick index >= 0, got {brick!r}; {_REEXPORT}")
        if kind == "embedder" and brick is not None:
            raise ManifestError(f"{where}: the embedder has no brick index, got {brick!r}; {_REEXPORT}")
        fmt = _require(d, "format", str, where)
        if fmt not in FORMATS:
            raise ManifestError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}; {_REEXPORT}")
        precision = _require(d, "precision", str, where)
        if precision not in PRECISIONS:
            raise ManifestError(f"{where}: precision {precision!r} is not one of {', '.join(PRECISIONS)}; {_REEXPORT}")
        sha = _require(d, "sha256", str, where)
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ManifestError(f"{where}: sha256 {sha!r} is not 64 lowercase hex digits; {_REEXPORT}")
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
            built_with=dict(d.get("built_with") or {}),
            verification=dict(d.get("verification") or {}),
        )


@dataclass(frozen=True)
class Manifest:
    """Contents of manifest.json: model config, checkpoint identity and the engines."""

    config: LegoConfig
    checkpoint: dict[str, Any]  # {"path": str|None, "sha256": str|None, "random_init_seed": int|None}
    engines: list[EngineEntry]
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    schema_version: int = SCHEMA_VERSION

    def engines_for(self, format: str) -> dict[str, EngineEntry]:
        """Engines of one format ("onnx" or "tensorrt") by name; empty when the directory has none."""
        if format not in FORMATS:
            raise ManifestError(f"unknown engine format {format!r}; valid formats: {', '.join(FORMATS)}")
        return {e.name: e for e in self.engines if e.format == format}

    def formats(self) -> list[str]:
        """Formats present in this directory, in FORMATS order."""
        return [f for f in FORMATS if any(e.format == f for e in self.engines)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "config": self.config.to_dict(),
            "checkpoint": dict(self.checkpoint),
            "created": self.created,
            "engines": [e.to_dict() for e in self.engines],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_NAME) -> Manifest:
        """Validate the structure of a parsed manifest (files are checked by :func:`load_manifest`)."""
        d = _require_dict(d, where)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"{where} has schema version {version!r}, this toolchain reads version {SCHEMA_VERSION}; {_REEXPORT}"
            )
        try:
            config = LegoConfig.from_dict(_require(d, "config", dict, where))
        except ConfigError as err:
            raise ManifestError(f"{where}: invalid model config ({err}); {_REEXPORT}") from None
        checkpoint = _require(d, "checkpoint", dict, where)
        for key in ("path", "sha256", "random_init_seed"):
            if key not in checkpoint:
                raise ManifestError(f"{where}: checkpoint lacks {key!r}; {_REEXPORT}")
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
        return cls(
            config=config,
            checkpoint=dict(checkpoint),
            engines=engines,
            created=str(d.get("created", "")),
            schema_version=version,
        )


def load_manifest(engine_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Read and validate ``engine_dir/manifest.json`` and every file it lists.

    Refuses (with one-line :class:`ManifestError`) a missing directory or
    manifest, corrupt JSON, an unknown schema version, missing or malformed
    fields, a file path that is absolute or leaves the directory, a missing
    file, and a file whose size or sha256 differs from the manifest.
    """
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise ManifestError(
            f"engine directory {engine_dir} does not exist; create it with lego-export --out {engine_dir}"
        )
    if not path.is_file():
        raise ManifestError(f"{engine_dir} has no {MANIFEST_NAME}; export into it with lego-export --out {engine_dir}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err}); re-export with lego-export --force") from None
    manifest = Manifest.from_dict(data, where=str(path))
    root = engine_dir.resolve()
    for e in manifest.engines:
        target = (engine_dir / e.file).resolve()
        # A symlink inside the directory could still point outside it.
        if not target.is_relative_to(root):
            raise ManifestError(f"{path}: engine {e.name!r} file {e.file!r} resolves outside {engine_dir}; refusing it")
        if not target.is_file():
            raise ManifestError(f"{path}: engine file {e.file} is missing; {_REEXPORT}")
        if verify_hashes:
            size = target.stat().st_size
            if size != e.bytes or file_sha256(target) != e.sha256:
                raise ManifestError(
                    f"{engine_dir / e.file} does not match its sha256 in {MANIFEST_NAME} (modified or truncated); "
                    f"{_REEXPORT}"
                )
    return manifest


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


def _require(d: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in d:
        raise ManifestError(f"{where}: required field {key!r} is missing; {_REEXPORT}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ManifestError(
            f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}; {_REEXPORT}"
        )
    return value


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
