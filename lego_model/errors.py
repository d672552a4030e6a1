"""The project's error hierarchy.

Every user mistake (bad path, corrupt file, wrong shape, unsupported option)
raises a :class:`LegoError` whose message says what was wrong and how to fix
it; the CLIs print that one line and exit non-zero.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


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


def checked_arguments(target: Any) -> Any:
    """Refuse a call whose arguments do not fit the signature (an unknown keyword, a missing or surplus argument)
    with a :class:`UsageError` naming what the function takes, instead of Python's TypeError.

    For the public API's functions and methods (decorate the function under ``@classmethod``) and, given a
    class, its ``__init__`` (put it above ``@dataclass``).  Only the binding is checked here; the values are the
    callee's to check.
    """
    if isinstance(target, type):
        target.__init__ = checked_arguments(target.__init__)
        return target
    signature = inspect.signature(target)
    name = target.__qualname__.removesuffix(".__init__")
    takes = [
        p.name
        for p in signature.parameters.values()
        if p.name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]

    @functools.wraps(target)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as err:
            raise UsageError(f"{name}: {err}; it takes {', '.join(takes)}") from None
        return target(*args, **kwargs)

    return call
