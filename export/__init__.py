"""Per-brick ONNX export, TensorRT build, and the manifest of an engine directory.

Only the manifest API is imported here, so that runtimes can read an engine
directory without loading onnx, onnxruntime or tensorrt.
"""

from export.errors import (
    BackendError,
    ExportError,
    ManifestError,
    MissingDependencyError,
    ProfileError,
    VerificationError,
)
from export.manifest import load_manifest, write_manifest
from export.records import (
    SCHEMA_VERSION,
    BuiltWith,
    CheckpointRecord,
    EngineEntry,
    Manifest,
    Profile,
    TensorSpec,
    VaeRecord,
    Verification,
)

__all__ = [
    "SCHEMA_VERSION",
    "BackendError",
    "BuiltWith",
    "CheckpointRecord",
    "EngineEntry",
    "ExportError",
    "Manifest",
    "ManifestError",
    "MissingDependencyError",
    "Profile",
    "ProfileError",
    "TensorSpec",
    "VaeRecord",
    "Verification",
    "VerificationError",
    "load_manifest",
    "write_manifest",
]
