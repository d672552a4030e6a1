"""Errors of the runtimes package; all derive from :class:`lego_model.errors.LegoError`.

``python -m runtimes.sample`` prints the one-line message of any of them and exits 1.
"""

from __future__ import annotations

from lego_model.errors import LegoError


class BackendError(LegoError):
    """A backend that cannot run here: missing library or GPU, or engines built for another GPU/TensorRT."""


class NonFiniteError(LegoError):
    """An engine produced NaN or Inf (typically fp16 overflow); names the engine and the sampling step."""


class OutputError(LegoError):
    """An output directory or file that cannot be written."""


class UsageError(LegoError):
    """The API used out of order or with arguments of the wrong shape, dtype or range; says what to pass."""
