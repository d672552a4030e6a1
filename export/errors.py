"""Errors of the export package; all derive from :class:`lego_model.errors.LegoError`.

The lego-export CLI prints the one-line message of any of them and exits 1.
"""

from __future__ import annotations

from lego_model.errors import LegoError, ShapeError

# How a ManifestError says to fix an engine directory that this toolchain's exporter did not write as it is.
REEXPORT = "re-run lego-export --force"


class ExportError(LegoError):
    """An export that cannot start or cannot finish (existing target, bad option, failed build)."""


class ManifestError(LegoError):
    """An engine directory whose manifest or files cannot be trusted."""


class ProfileError(ShapeError):
    """A shape range that is malformed, or a shape outside an engine's optimization profile."""


class VerificationError(ExportError):
    """An exported file whose outputs differ from the eager brick by more than the tolerance."""


class MissingDependencyError(ExportError):
    """An optional library (tensorrt, onnxruntime) or a GPU that the requested engines need is absent."""
