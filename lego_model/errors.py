"""The project's error hierarchy.

Every user mistake (bad path, corrupt file, wrong shape, unsupported option)
raises a :class:`LegoError` whose message says what was wrong and how to fix
it; the CLIs print that one line and exit non-zero.
"""

from __future__ import annotations


class LegoError(Exception):
    """Base class of every error a user can cause and fix."""


class ConfigError(LegoError):
    """Unknown or inconsistent model configuration."""


class ShapeError(LegoError):
    """An image size, batch or tensor shape the model cannot take."""


class TextError(LegoError):
    """A number read from text (an option, a rule, a field of a file) that is not in its form or range."""


class SkipPlanError(LegoError):
    """A skip rule or preset that cannot be parsed or leaves a step empty."""


class CheckpointError(LegoError):
    """A checkpoint that cannot be read or does not fit its configuration."""


class VaeError(LegoError):
    """An autoencoder (``--vae``) that cannot be loaded or does not fit the model's latents."""


class NonFiniteError(LegoError):
    """A denoiser call produced NaN or Inf; the message names where (engine, sampling step) and the likely cause."""


class OutputError(LegoError):
    """An output directory or file that cannot (or may not) be written."""


class UsageError(LegoError):
    """An API used out of order or with arguments of the wrong type, shape or range; the message says what to pass."""


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a CLI prints."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
