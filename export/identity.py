"""Which engine a file is: identity metadata of ONNX files and TensorRT plans, and the I/O they declare.

lego-export writes an identity into every engine file before hashing it
(:func:`engine_identity`: engine name, kind, brick, precision, fingerprints of
the model config and the weights): as metadata props of an ONNX file, and as
the network name of a TensorRT plan (:func:`plan_name`).  The loaders compare
it with the file's manifest entry (:func:`check_onnx_identity` when the
manifest is loaded, :func:`check_plan_identity` when a plan is deserialized),
and the inputs and outputs the file declares with the entry's
(:func:`check_engine_io`), so a file copied into another engine's slot, or a
config that disagrees with the files, is refused before it runs.
"""

from __future__ import annotations

import hashlib
import json

from export.errors import REEXPORT, ManifestError
from export.onnx_wire import onnx_declaration
from export.records import VAE_ENGINE, CheckpointRecord, EngineEntry, FileTensor, Manifest, TensorSpec
from lego_model.configs import LegoConfig

__all__ = [
    "check_engine_io",
    "check_identity",
    "check_onnx_identity",
    "check_plan_identity",
    "config_fingerprint",
    "engine_identity",
    "entry_identity",
    "plan_name",
]


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
    fix = f"the file belongs to another engine or model; {REEXPORT}"
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


def check_onnx_identity(content: bytes, entry: EngineEntry, manifest: Manifest, where: str) -> None:
    """Refuse an ONNX file that is not ``entry``'s engine of ``manifest``'s model, or whose I/O is not the entry's."""
    props, inputs, outputs = onnx_declaration(content, where)
    want = entry_identity(entry, manifest)
    if not any(key in props for key in want):
        raise ManifestError(
            f"{where} carries no lego-export identity metadata (written by an older lego-export or another tool); "
            f"{REEXPORT}"
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
                f"entry needs {value!r} (a file of another engine or export in this slot); {REEXPORT}"
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
        raise ManifestError(f"{where}: its identity {name[:80]!r} is unreadable; {REEXPORT}")
    check_identity(where, found, want)
    return None
