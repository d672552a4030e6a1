"""Numbers read from text: skip rules, seeds, shape ranges, command-line options, file metadata.

Python's ``int()`` and ``float()`` read far more than a user means to type:
any script's decimal digits (``int('١')`` is 1), underscores (``int('1_0')`` is
10), ``'nan'``, ``'infinity'``, and they fail on other look-alikes (``int('²')``
is a ValueError).  Every number the project reads from text goes through this
module instead, which accepts exactly these forms:

* a whole number: ASCII digits 0-9 only (leading zeros allowed, read as
  decimal); no sign, underscore, decimal point or exponent;
* a decimal number: ASCII digits with an optional decimal point (``0.6``,
  ``.5``, ``1.``) and an optional exponent (``5e-4``); no sign, underscore,
  ``nan`` or ``inf`` (the word ``inf`` only where a range has no upper bound);
* either one with ASCII spaces or tabs around it (``--skip '0, 1@0:0.5'``).

Every value is checked against explicit bounds (a whole number before it is
converted, so a 5,000-digit text costs nothing), and a refusal is one
:class:`~lego_model.errors.TextError` line naming the field, the text and the
accepted range.  :class:`BoundedInt` and :class:`BoundedFloat` are the same
parsers as click option types, for every command line of the project.

:func:`parse_json` reads a JSON document a user may have edited (run.json):
``json.loads`` fails it in a traceback when it is nested deeper than
Python's recursion limit (RecursionError) or holds an integer beyond its
4,300-digit conversion limit (ValueError), and quietly accepts ``NaN``,
``Infinity`` and ``1e999``; here each is a :class:`TextError` line.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import click

from lego_model.errors import TextError

__all__ = [
    "BLANKS",
    "BoundedFloat",
    "BoundedInt",
    "is_whole_number",
    "parse_float",
    "parse_fraction",
    "parse_int",
    "parse_json",
    "quoted",
]

BLANKS = " \t"  # allowed around a number; only ASCII: str.strip() would also drop U+3000, U+00A0 and look-alikes
# ASCII only: str.isdigit(), \d and int() also take other scripts' digits and characters like '²'.
_WHOLE = re.compile(r"[0-9]+")
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
MAX_JSON_DIGITS = 100  # digits of a JSON number: none the project writes has more than 20
_SHOWN = 24  # characters of a text shown in full in a message; longer ones are cut


def quoted(text: str) -> str:
    """``repr(text)`` for a message, cut to its first characters and length when long (one short line)."""
    if len(text) <= _SHOWN:
        return repr(text)
    return f"{text[: _SHOWN // 2]!r}... ({len(text)} characters)"


def _number(body: str) -> str:
    """A text already known to be a number, unquoted, cut when long."""
    if len(body) <= _SHOWN:
        return body
    unit = "digits" if body.isdigit() else "characters"
    return f"{body[: _SHOWN // 2]}... ({len(body)} {unit})"


def _subject(what: str, shown: str) -> str:
    return f"{what} {shown}" if what else shown


def _text(text: Any, what: str) -> str:
    if not isinstance(text, str):
        raise TextError(f"{what or 'value'}: expected text, got {type(text).__name__}")
    return text.strip(BLANKS)


def is_whole_number(text: str) -> bool:
    """Whether ``text`` has the form :func:`parse_int` reads (for callers that word a form error their own way)."""
    return isinstance(text, str) and _WHOLE.fullmatch(text.strip(BLANKS)) is not None


def parse_int(text: str, what: str, low: int, high: int) -> int:
    """The whole number ``text`` writes, which must lie in [low, high] (both required, low >= 0).

    ``what`` names the field in the message (``"seed"``, ``"--batch MAX"``;
    empty where the caller adds its own name, as click does).
    """
    body = _text(text, what)
    if not _WHOLE.fullmatch(body):
        raise TextError(
            f"cannot parse {_subject(what, quoted(body))} as a whole number: write ASCII digits 0-9, "
            f"from {low} to {high}"
        )
    digits = body.lstrip("0") or "0"
    # Longer than the bound's digits is out of range before int() reads it (int() refuses > 4300 digits).
    if len(digits) > len(str(high)) or not low <= int(digits) <= high:
        raise TextError(f"{_subject(what, _number(body))} is out of range (minimum {low}, maximum {high})")
    return int(digits)


def parse_float(text: str, what: str, low: float, high: float, *, finite: bool = False) -> float:
    """The decimal number ``text`` writes, which must lie in [low, high] (finite low >= 0; high may be inf, and
    ``inf`` is then a value unless ``finite``)."""
    body = _text(text, what)
    takes_inf = high == math.inf and not finite
    if body == "inf" and takes_inf:
        return math.inf
    if body == "inf" and finite:
        raise TextError(f"{_subject(what, 'inf')} is not a finite number: write a decimal of at least {low:g}")
    if not _DECIMAL.fullmatch(body):
        accepted = f"from {low:g} to {high:g}" if math.isfinite(high) else f"of at least {low:g}"
        raise TextError(
            f"cannot parse {_subject(what, quoted(body))} as a number: write a decimal such as 0.6 or 5e-4 "
            f"{accepted}{', or inf' if takes_inf else ''} (ASCII digits; no sign or nan)"
        )
    value = float(body)  # the grammar above is a subset of float()'s; a huge exponent gives inf, refused below
    if finite and not math.isfinite(value):
        raise TextError(f"{_subject(what, _number(body))} is not a finite number: write a decimal of at least {low:g}")
    if not low <= value <= high:
        raise TextError(f"{_subject(what, _number(body))} is outside [{low:g}, {high:g}]")
    return value


def parse_fraction(text: str, what: str) -> float:
    """A decimal number in [0, 1] (fractions of sampling progress), as :func:`parse_float` reads it."""
    return parse_float(text, what, 0.0, 1.0)


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_DIGITS:
        raise TextError(f"a number of {len(text.lstrip('-'))} digits (at most {MAX_JSON_DIGITS})")
    return int(text)


def _json_float(text: str) -> float:
    if len(text) > 4 * MAX_JSON_DIGITS:
        raise TextError(f"a number of {len(text)} characters (at most {4 * MAX_JSON_DIGITS})")
    value = float(text)
    if not math.isfinite(value):
        raise TextError(f"the number {_number(text)}, which is not finite")
    return value


def _json_constant(name: str, infinity: bool) -> Any:
    if infinity and name == "Infinity":
        return math.inf
    raise TextError(f"{name}, which is not a JSON number")


def parse_json(text: str | bytes, *, infinity: bool = False) -> Any:
    """The JSON document ``text``; a :class:`TextError` line for anything that is not plain JSON data.

    Refused: what ``json.loads`` refuses, nesting beyond Python's recursion
    limit, numbers of more than :data:`MAX_JSON_DIGITS` digits, ``NaN``,
    ``-Infinity``, ``Infinity`` (unless ``infinity``: what ``json.dumps``
    writes for an unbounded value, e.g. EDM's S_max) and numbers that
    overflow to it.  The message says what was wrong, for the caller to
    prefix with the file's name.
    """
    try:
        return json.loads(
            text,
            parse_int=_json_int,
            parse_float=_json_float,
            parse_constant=lambda name: _json_constant(name, infinity),
        )
    except RecursionError:
        raise TextError("nested too deeply") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TextError(f"not JSON ({str(err).splitlines()[0]})") from None


def _check_bounds(low: float, high: float) -> None:
    # A programming error, not a user's: every bound of the project is a number >= 0, finite below.
    if not (math.isfinite(low) and 0 <= low <= high):
        raise ValueError(f"bounds must satisfy 0 <= low <= high, low finite; got {low!r}, {high!r}")


class BoundedInt(click.IntRange):
    """A click integer option from ``low`` to ``high`` (both required), read by :func:`parse_int`.

    A refusal is click's usage error (exit code 2) whose one ``Error:`` line
    names the option, the text and the range, as for ``click.IntRange``.
    """

    def __init__(self, low: int, high: int) -> None:
        if not (isinstance(low, int) and isinstance(high, int)):
            raise ValueError(f"BoundedInt takes int bounds, got {low!r}, {high!r}")
        _check_bounds(low, high)
        super().__init__(low, high)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, str):
            try:
                value = parse_int(value, "", self.min, self.max)
            except TextError as err:
                self.fail(str(err), param, ctx)
        return super().convert(value, param, ctx)


class BoundedFloat(click.FloatRange):
    """A click number option from ``low`` to ``high`` (``low_open``: ``low`` itself refused; ``finite``: an
    unbounded ``high`` that still refuses inf), read by :func:`parse_float`."""

    def __init__(self, low: float, high: float, low_open: bool = False, *, finite: bool = False) -> None:
        _check_bounds(low, high)
        self.finite = finite
        # click shows the range in --help: x>=0.0 for a finite unbounded option, not 0.0<=x<=inf
        super().__init__(float(low), None if finite and high == math.inf else float(high), min_open=low_open)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, str):
            high = math.inf if self.max is None else self.max
            try:
                value = parse_float(value, "", self.min, high, finite=self.finite)
            except TextError as err:
                self.fail(str(err), param, ctx)
        return super().convert(value, param, ctx)
