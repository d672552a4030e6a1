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

The records and their field checks are :mod:`export.records` (exact keys,
one spelling: lego-export is the only writer).  :func:`load_manifest` is the
only way the runtimes read a directory: it checks the schema version, every
field, that every file stays inside the directory, exists and has the
recorded sha256, and that every ONNX file is the engine its entry says it is
(:func:`export.identity.check_onnx_identity`: its identity metadata and
declared graph I/O).  The entries' I/O must be the engine contract of the
manifest's config (:func:`export.records.contract_io`).  A file copied into
another engine's slot, or a config that disagrees with the files, is refused
before any session is created.  TensorRT plans are opaque here: their loader
(:func:`export.loaders.engine_from_entry`) checks their identity and I/O when
it deserializes them.  Each refusal is one :class:`ManifestError` line that
says what to do.

A latent model's directory may add a ``vae_decoder`` engine (latents ->
images, 8x each side) and a top-level ``"vae"`` record of the autoencoder it
was exported from (:class:`VaeRecord`: source path, weights sha256, scaling
factor); the key is absent in directories without a decoder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from export.errors import REEXPORT, REEXPORT_UNREADABLE, ManifestError
from export.identity import check_onnx_identity
from export.records import MANIFEST_NAME, EngineEntry, Manifest
from lego_model.checkpoints import file_sha256

__all__ = ["MANIFEST_NAME", "load_manifest", "read_manifest_json", "write_manifest"]

# manifest.json is a few KB per engine; anything near this is not one of ours.
MAX_MANIFEST_BYTES = 16 << 20


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
            raise ManifestError(f"{path}: engine file {e.file} is missing; {REEXPORT}")
        where = f"{engine_dir / e.file} (engine {e.name})"
        if e.format == "onnx":
            with _mapped(target) as content:  # read once: hashed and its declaration cut out of the same pages
                if verify_hashes:
                    _check_hash(e, len(content), hashlib.sha256(content).hexdigest(), engine_dir)
                check_onnx_identity(content, e, manifest, where)
        elif verify_hashes:
            _check_hash(e, target.stat().st_size, file_sha256(target), engine_dir)
    return manifest


def read_manifest_json(path: Path, *, fix: str | None = REEXPORT_UNREADABLE) -> Any:
    """The parsed JSON of a manifest file; one-line :class:`ManifestError` for anything that is not one, ending in
    ``fix`` (how to repair the directory; None: the caller says it)."""
    suffix = f"; {fix}" if fix else ""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(
                f"{path} is {size} bytes, no manifest.json lego-export writes is over {MAX_MANIFEST_BYTES}{suffix}"
            )
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, and ints beyond Python's digit limit
        raise ManifestError(f"{path} is not valid JSON ({str(err).splitlines()[0]}){suffix}") from None
    except RecursionError:
        raise ManifestError(f"{path} is nested too deeply to be a manifest{suffix}") from None
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
            f"{REEXPORT}"
        )


def write_manifest(manifest: Manifest, engine_dir: str | Path) -> Path:
    """Write ``engine_dir/manifest.json`` (via a temporary file and a rename); returns its path."""
    # Round-trip through the validator so that a writer bug cannot produce a directory the loader refuses.
    Manifest.from_dict(json.loads(manifest.to_json()), where="manifest being written")
    path = Path(engine_dir) / MANIFEST_NAME
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, path)
    return path
