"""Skip plans: which bricks run at which sampling step.

A rule ``BRICKS@FROM:TO`` skips the listed bricks (comma-separated indices, or
``top`` for the last brick) on every step i of N with FROM <= i/N < TO.  The
presets follow the paper's two findings (Zheng et al. 2024, Sec. 4.3):

* ``global@F``: the global bricks (largest tiles) are off from progress F to the
  end, the low-noise part where detail, not layout, is being refined;
* ``local@F``: the local bricks (smallest tiles) are off from the start to F,
  the high-noise part where only the global layout matters.

Indices and fractions are read by :mod:`lego_model.parsing`: indices in ASCII
digits, fractions as decimal numbers in [0, 1] (``0.6``, ``.25``, ``1``), with
spaces allowed around each part (``0, 1@0:0.5``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lego_model.configs import MAX_BRICKS, LegoConfig
from lego_model.errors import SkipPlanError, TextError, checked_arguments
from lego_model.flops import denoiser_flops
from lego_model.parsing import BLANKS, parse_fraction, parse_int, quoted
from lego_model.sampler import Solver, check_num_steps, evaluations_per_step

PRESETS = {"global": 0.6, "local": 0.4}  # preset -> default break point


@checked_arguments
@dataclass(frozen=True)
class SkipRule:
    """Skip ``bricks`` on every step i of N with ``start <= i/N < stop`` (both in [0, 1], start below stop)."""

    bricks: tuple[int, ...]
    start: float
    stop: float

    def __post_init__(self) -> None:
        # The constructor is public API too: the same rules as the text form (_parse_rule), as SkipPlanErrors.
        bricks = self.bricks
        if not (isinstance(bricks, tuple) and bricks and all(_is_index(k) for k in bricks)):
            raise SkipPlanError(f"SkipRule bricks: expected a non-empty tuple of brick indices, got {bricks!r}")
        object.__setattr__(self, "bricks", tuple(sorted({int(k) for k in bricks})))
        for name in ("start", "stop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                raise SkipPlanError(
                    f"SkipRule {name}: expected a fraction of sampling progress in [0, 1], got {value!r}"
                )
            object.__setattr__(self, name, float(value))
        if self.start >= self.stop:
            raise SkipPlanError(f"SkipRule: start {self.start:g} must be below stop {self.stop:g}")

    def covers(self, step: int, num_steps: int) -> bool:
        return self.start <= step / num_steps < self.stop

    def __str__(self) -> str:
        return f"{','.join(map(str, self.bricks))}@{_fraction_text(self.start)}:{_fraction_text(self.stop)}"


@checked_arguments
@dataclass(frozen=True)
class SkipPlan:
    """Maps each step i of N to its active (non-skipped) brick set."""

    num_bricks: int
    rules: tuple[SkipRule, ...] = ()

    def __post_init__(self) -> None:
        n = self.num_bricks
        if not _is_index(n) or not 1 <= n <= MAX_BRICKS:
            raise SkipPlanError(
                f"SkipPlan num_bricks: expected an int in 1..{MAX_BRICKS} (config.num_bricks), got {n!r}"
            )
        rules = self.rules
        if not (isinstance(rules, tuple) and all(isinstance(r, SkipRule) for r in rules)):
            raise SkipPlanError(
                f"SkipPlan rules: expected a tuple of SkipRule (or use SkipPlan.of(text, config)), got {rules!r}"
            )
        for rule in rules:
            if max(rule.bricks) >= n:
                raise SkipPlanError(
                    f"skip rule {rule}: brick {max(rule.bricks)} does not exist; the plan has bricks 0..{n - 1}"
                )

    @classmethod
    @checked_arguments
    def parse(cls, rules: str | Sequence[str], config: LegoConfig) -> SkipPlan:
        """Plan for ``config`` from ``--skip`` texts such as ``2@0.6:1`` or ``top,0@0:0.25`` (one text or several)."""
        if not isinstance(config, LegoConfig):
            raise SkipPlanError(
                f"SkipPlan.parse(rules, config) takes the model's LegoConfig (model.config), got {config!r}"
            )
        rules = _texts(rules, "rules: pass rule text such as '2@0.6:1' or a list of such texts")
        n = config.num_bricks
        return cls(n, tuple(_parse_rule(text, n) for text in rules))

    @classmethod
    @checked_arguments
    def of(cls, plan: SkipPlan | str | Sequence[str] | None, config: LegoConfig) -> SkipPlan:
        """The plan an API argument names, for ``config``: None (the full stack), a SkipPlan, or text.

        Text is one item or a sequence of items, each a rule (``2@0.6:1``) or a
        preset (``global``, ``local@0.3``); ``"full stack"`` (what ``str()`` of
        an empty plan gives) and ``""`` are the full stack.
        """
        if plan is None:
            return cls(config.num_bricks)
        if isinstance(plan, SkipPlan):
            if plan.num_bricks != config.num_bricks:
                raise SkipPlanError(
                    f"skip plan {plan} is for {plan.num_bricks} bricks; {config.name} has {config.num_bricks}"
                )
            return plan
        items = _texts(plan, "plan: pass a SkipPlan, rule text such as '2@0.6:1', or preset names")
        result = cls(config.num_bricks)
        for text in items:
            if text.strip(BLANKS) in ("", "full stack"):
                continue
            if text.partition("@")[0].strip(BLANKS) in PRESETS:
                result = result + cls.preset(text, config)
            else:
                result = result + cls.parse(text, config)
        return result

    @classmethod
    @checked_arguments
    def from_text(
        cls, config: LegoConfig, skip: str | Sequence[str] = (), presets: str | Sequence[str] = ()
    ) -> SkipPlan:
        """One plan from ``--skip`` rules and ``--skip-preset`` names (each a text or a sequence of texts)."""
        plan = cls.parse(skip, config)
        for name in _texts(presets, "presets: pass preset texts such as 'global@0.6'"):
            plan = plan + cls.preset(name, config)
        return plan

    @classmethod
    @checked_arguments
    def preset(cls, spec: str, config: LegoConfig) -> SkipPlan:
        """``global``, ``local``, ``global@0.7`` or ``local@0.3`` for this config's bricks (F in [0, 1])."""
        if not isinstance(spec, str):
            raise SkipPlanError(f"skip preset: pass text such as 'global@0.6', got {type(spec).__name__}")
        name, at_sign, at = (part.strip(BLANKS) for part in spec.partition("@"))
        if name not in PRESETS:
            raise SkipPlanError(f"unknown skip preset {quoted(spec)}; use global[@F] or local[@F], F in [0, 1]")
        point = _fraction(at, "F", spec, "skip preset") if at_sign else PRESETS[name]
        if config.global_bricks == config.local_bricks:
            raise SkipPlanError(f"{config.name}: all bricks have the same size, so there is no {name} brick to skip")
        start, stop = (point, 1.0) if name == "global" else (0.0, point)
        if start == stop:  # global@1, local@0: an empty window skips nothing (SkipRule refuses an empty one)
            return cls(config.num_bricks, ())
        bricks = config.global_bricks if name == "global" else config.local_bricks
        return cls(config.num_bricks, (SkipRule(bricks, start, stop),))

    def __add__(self, other: SkipPlan) -> SkipPlan:
        if not isinstance(other, SkipPlan) or other.num_bricks != self.num_bricks:
            got = f"a plan for {other.num_bricks} bricks" if isinstance(other, SkipPlan) else type(other).__name__
            raise SkipPlanError(f"a SkipPlan for {self.num_bricks} bricks adds only another for as many, got {got}")
        return SkipPlan(self.num_bricks, self.rules + other.rules)

    def active(self, step: int, num_steps: int) -> tuple[int, ...]:
        skipped = {k for rule in self.rules if rule.covers(step, num_steps) for k in rule.bricks}
        return tuple(k for k in range(self.num_bricks) if k not in skipped)

    def steps(self, num_steps: int) -> list[tuple[int, ...]]:
        """Active brick set per step; a step left with no brick is an error."""
        check_num_steps(num_steps)
        out = [self.active(i, num_steps) for i in range(num_steps)]
        for i, act in enumerate(out):
            if not act:
                raise SkipPlanError(
                    f"skip plan {self} leaves step {i} of {num_steps} with no brick; at least one brick must run"
                )
        return out

    def relative_cost(self, config: LegoConfig, num_steps: int, solver: Solver, height: int, width: int) -> float:
        """FLOPs of the whole sampling run relative to running every brick at every step."""
        evals = evaluations_per_step(num_steps, solver)
        full = denoiser_flops(config, height, width)
        used = sum(n * denoiser_flops(config, height, width, act) for n, act in zip(evals, self.steps(num_steps)))
        return used / (full * sum(evals))

    def describe(self, config: LegoConfig, num_steps: int, solver: Solver, height: int, width: int) -> str:
        """A readable table: steps, their active bricks, and the plan's relative cost."""
        steps = self.steps(num_steps)
        lines = [f"skip plan: {self}   ({config.name}, {num_steps} {solver} steps, {height}x{width})"]
        start = 0
        for i in range(1, num_steps + 1):
            if i == num_steps or steps[i] != steps[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                sizes = ",".join(str(config.brick_sizes[k]) for k in steps[start])
                lines.append(f"  steps {span:>7}: bricks {list(steps[start])} (tile sizes {sizes})")
                start = i
        cost = self.relative_cost(config, num_steps, solver, height, width)
        lines.append(f"  relative cost: {cost:.3f} of the full stack ({1 - cost:.1%} fewer FLOPs)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return " ".join(map(str, self.rules)) if self.rules else "full stack"


def _is_index(value: object) -> bool:
    """A non-negative integer (Python or numpy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0


def _texts(value: str | Sequence[str], expected: str) -> tuple[str, ...]:
    """One text or a sequence of texts, as a tuple; anything else is refused (a str is one text, not characters)."""
    items = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Sequence) else None
    if items is None or not all(isinstance(t, str) for t in items):
        raise SkipPlanError(f"{expected}; got {type(value).__name__}")
    return items


def _fraction(text: str, field: str, rule: str, kind: str = "skip rule") -> float:
    try:
        return parse_fraction(text, field)
    except TextError as err:
        raise SkipPlanError(f"{kind} {quoted(rule)}: {err}") from None


def _fraction_text(value: float) -> str:
    """The shortest positional decimal that reads back as ``value``: ``str(rule)`` parses back to the same rule."""
    return np.format_float_positional(value, trim="-")


def _parse_rule(text: str, num_bricks: int) -> SkipRule:
    where, _, span = text.partition("@")
    parts = span.split(":")
    if "@" not in text or "@" in span or len(parts) != 2:
        raise SkipPlanError(f"cannot parse skip rule {quoted(text)}; write BRICKS@FROM:TO, e.g. 2@0.6:1 or top@0.5:1")
    bricks: list[int] = []
    for item in where.split(","):
        item = item.strip(BLANKS)
        if item == "top":
            bricks.append(num_bricks - 1)
            continue
        try:
            k = parse_int(item, "brick", 0, MAX_BRICKS - 1)
        except TextError:
            raise SkipPlanError(
                f"skip rule {quoted(text)}: {quoted(item)} is not a brick index (ASCII digits) or 'top'; "
                f"this model has bricks 0..{num_bricks - 1}"
            ) from None
        if k >= num_bricks:
            raise SkipPlanError(
                f"skip rule {quoted(text)}: brick {k} does not exist; this model has bricks 0..{num_bricks - 1}"
            )
        bricks.append(k)
    start, stop = _fraction(parts[0], "FROM", text), _fraction(parts[1], "TO", text)
    if start >= stop:
        raise SkipPlanError(f"skip rule {quoted(text)}: FROM must be below TO")
    return SkipRule(tuple(sorted(set(bricks))), start, stop)
