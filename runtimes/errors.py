"""Errors of the runtimes package; all derive from :class:`lego_model.errors.LegoError`.

``python -m runtimes.sample`` prints the one-line message of any of them and exits 1.
"""

from __future__ import annotations

from export.errors import BackendError
from lego_model.errors import NonFiniteError, OutputError, UsageError

# NonFiniteError, OutputError and UsageError are lego_model's: the eager path and the request raise them too.
# BackendError is export's: the engine loaders (export.loaders) that backends and lego-export's verification share
# raise it.
__all__ = ["BackendError", "NonFiniteError", "OutputError", "UsageError"]
