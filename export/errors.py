"""Errors of the export package; all derive from :class:`lego_model.errors.LegoError`.

The lego-export CLI prints the one-line message of any of them and exits 1.
"""

from __future__ import annotations

from lego_model.errors import LegoError, ShapeError

# How a ManifestError says to fix an engine directory that this toolchain's exporter did not write as it is.
REEXPORT = "re-run lego-export --force"
# ... and one whose manifest cannot be read at all: --force replaces only the files a readable manifest lists.
REEXPORT_UNREADABLE = (
    "remove the directory and run lego-export again (--force replaces only what a readable manifest lists)"
)


class ExportError(LegoError):
    """An export that cannot start or cannot finish (existing target, bad option, failed build)."""


class ManifestError(LegoError):
    """An engine directory whose manifest or files cannot be trusted."""


class BackendError(LegoError):
    """A backend that cannot run here: a missing library (onnxruntime, tensorrt) or GPU, a file its library cannot
    load, or engines built for another GPU/TensorRT.

    Raised by the engine loaders (:mod:`export.loaders`), which the runtimes' backends and lego-export's
    verification share; the runtimes raise it too (``runtimes.errors`` re-exports it).
    """


class ProfileError(ShapeError):
    """A shape range that is malformed, or a shape outside an engine's optimization profile."""


class VerificationError(ExportError):
    """An exported file whose outputs differ from the eager brick by more than the tolerance."""


class MissingDependencyError(ExportError):
    """TensorRT or a GPU, which the requested TensorRT engines need, is absent (a missing onnxruntime is a
    :class:`BackendError` of the loaders)."""
