"""Errors of the runtimes package; all derive from :class:`lego_model.errors.LegoError`.

``python -m runtimes.sample`` prints the one-line message of any of them and exits 1.
"""

from __future__ import annotations

from lego_model.errors import LegoError, NonFiniteError, OutputError, UsageError

# NonFiniteError, OutputError and UsageError are lego_model's: the eager path and the request raise them too.
__all__ = ["BackendError", "NonFiniteError", "OutputError", "UsageError"]


class BackendError(LegoError):
    """A backend that cannot run here: missing library or GPU, or engines built for another GPU/TensorRT."""
