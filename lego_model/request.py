"""One sampling request: everything that decides a batch of images, validated once where it is built.

A :class:`Request` names the seeds, their classes, the canvas, the skip plan,
guidance, solver, steps, churn, the batch size and the output form.  The
eager model (:func:`lego_model.eager.sample`), the runtimes' ``Generator``
and the sample CLI all take this one object; the CLI builds it from its
options, and ``run.json`` is written from (and compared against)
:meth:`Request.settings`.  Building one checks every field against the model
config, so whoever holds a Request holds a valid one.

:func:`sample_batches` is the one loop that turns a request into images, batch
by batch: per-seed latents and labels (the authors' draw order), one
``open_batch`` block per batch -- the eager model's or a runtime chain's
denoiser -- and the EDM sampler inside it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lego_model.configs import LegoConfig
from lego_model.errors import ShapeError, UsageError, checked_arguments, first_line
from lego_model.flops import check_memory
from lego_model.images import MAX_SEEDS
from lego_model.sampler import (
    MAX_BATCH,
    MAX_STEPS,
    SEED_RANGE,
    SOLVERS,
    Denoiser,
    Solver,
    StackedRandomGenerator,
    check_churn,
    draw_latents,
    edm_sample,
)
from lego_model.skip import SkipPlan

Output = Literal["tensor", "uint8", "pil", "latents"]
# tensor: float64 [N, C, H, W] images in [-1, 1]; uint8: numpy NHWC; pil: PIL images; latents: a latent
# model's float64 latents, undecoded (only when asked: every other output of a latent model is decoded).
OUTPUTS: tuple[str, ...] = ("tensor", "uint8", "pil", "latents")


@checked_arguments
@dataclass(frozen=True)
class Churn:
    """EDM's stochastic sampling settings (Karras et al. 2022, Algorithm 2): off unless ``S_churn > 0``."""

    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self) -> None:
        for name in ("S_churn", "S_min", "S_max", "S_noise"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise UsageError(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        check_churn(self.S_churn, self.S_min, self.S_max, self.S_noise)

    @property
    def on(self) -> bool:
        return self.S_churn > 0

    def kwargs(self) -> dict[str, float]:
        """The sampler's keyword arguments (``edm_sample(..., **churn.kwargs())``)."""
        return {"S_churn": self.S_churn, "S_min": self.S_min, "S_max": self.S_max, "S_noise": self.S_noise}


@checked_arguments
@dataclass(frozen=True)
class Request:
    """What to sample, in canonical form; every field is checked against ``config`` when it is built.

    Build one with :meth:`make` (which also takes the loose forms an API user
    types: a range of seeds, one side for a square canvas, plan text) or with
    the constructor (canonical types only).  ``classes``: None (a random class
    per seed, as the authors draw it), one class for every seed, or one per
    seed.  ``batch``: images per batch, or None for the runner's default;
    results do not depend on it.  ``active`` (derived) is the plan's brick set
    of every step; a plan that leaves a step without bricks is refused.
    """

    config: LegoConfig
    seeds: tuple[int, ...]
    height: int
    width: int
    classes: int | tuple[int, ...] | None = None
    plan: SkipPlan | None = None
    cfg_scale: float | None = None
    steps: int = 18
    solver: Solver = "heun"
    churn: Churn = field(default_factory=Churn)
    batch: int | None = None
    output: Output = "tensor"
    active: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        cfg = self.config
        if not isinstance(cfg, LegoConfig):
            raise UsageError(f"config: expected the model's LegoConfig (model.config), got {cfg!r}")
        seeds_expected = "ints in [0, 2**32), at least one"
        if not isinstance(self.seeds, tuple) or not self.seeds or not all(_is_int(s) for s in self.seeds):
            raise UsageError(f"seeds: expected a tuple of {seeds_expected}, got {self.seeds!r}")
        _check_count(len(self.seeds))
        seeds = tuple(operator.index(s) for s in self.seeds)
        for s in seeds:
            if not 0 <= s < SEED_RANGE:
                raise UsageError(f"seeds: expected {seeds_expected}, got {s!r}")
        if len(set(seeds)) != len(seeds):
            seen: set[int] = set()
            dup = next(s for s in seeds if s in seen or seen.add(s))
            raise UsageError(f"seeds: seed {dup} is given more than once; list each seed once")
        object.__setattr__(self, "seeds", seeds)
        for name in ("height", "width"):
            if not _is_int(getattr(self, name)):
                raise UsageError(f"{name}: expected an int, got {getattr(self, name)!r}")
            object.__setattr__(self, name, operator.index(getattr(self, name)))
        cfg.check_image_size(self.height, self.width)
        class_expected = f"ints in [0, {cfg.label_dim})"
        if isinstance(self.classes, tuple):
            if len(self.classes) != len(seeds):
                raise UsageError(
                    f"classes: {len(self.classes)} given for {len(seeds)} seeds; pass one per seed or one int"
                )
            object.__setattr__(self, "classes", tuple(_as_int(c, "classes", class_expected) for c in self.classes))
            for c in self.classes:
                cfg.check_class(c)
        elif self.classes is not None:
            object.__setattr__(self, "classes", _as_int(self.classes, "classes", class_expected + " or None"))
            cfg.check_class(self.classes)
        if self.plan is not None and not isinstance(self.plan, SkipPlan):
            raise UsageError(f"plan: expected a SkipPlan or None (Request.make takes text), got {self.plan!r}")
        plan = SkipPlan.of(self.plan, cfg)  # None -> the full stack; refuses a plan for another brick count
        object.__setattr__(self, "plan", plan)
        if self.cfg_scale is not None:
            scale = self.cfg_scale
            if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
                raise UsageError(f"cfg_scale must be a number or None, got {scale!r}")
            object.__setattr__(self, "cfg_scale", float(scale))
        cfg.check_guidance(self.cfg_scale)  # the range, NaN and Inf included
        if not runs_guided(self.cfg_scale):  # recorded in run.json as guidance "off"
            object.__setattr__(self, "cfg_scale", None)
        if not _is_int(self.steps) or not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"steps must be an int in 1..{MAX_STEPS}, got {self.steps!r}")
        object.__setattr__(self, "steps", operator.index(self.steps))
        if self.solver not in SOLVERS:
            raise UsageError(f"solver must be one of {', '.join(map(repr, SOLVERS))}, got {self.solver!r}")
        if not isinstance(self.churn, Churn):
            raise UsageError(f"churn: expected a lego_model.request.Churn, got {self.churn!r}")
        if self.batch is not None:
            if not _is_int(self.batch) or not 1 <= self.batch <= MAX_BATCH:
                raise UsageError(f"batch must be an int in 1..{MAX_BATCH} or None, got {self.batch!r}")
            object.__setattr__(self, "batch", operator.index(self.batch))
        if self.output not in OUTPUTS:
            raise UsageError(f"output must be one of {', '.join(OUTPUTS)}, got {self.output!r}")
        if self.output == "latents" and not cfg.is_latent:
            raise UsageError(f"output='latents' is for latent models; {cfg.name} samples pixels: use 'tensor'")
        object.__setattr__(self, "active", tuple(plan.steps(self.steps)))  # refuses a step without bricks

    # ------------------------------------------------------------------ construction from loose forms
    @classmethod
    @checked_arguments
    def make(
        cls,
        config: LegoConfig,
        seeds: int | Iterable[int],
        classes: int | Sequence[int] | None = None,
        size: int | tuple[int, int] | None = None,
        plan: SkipPlan | str | Sequence[str] | None = None,
        cfg_scale: float | None = None,
        steps: int = 18,
        solver: Solver = "heun",
        *,
        churn: Churn | None = None,
        S_churn: float = 0.0,
        S_min: float = 0.0,
        S_max: float = math.inf,
        S_noise: float = 1.0,
        batch: int | None = None,
        output: Output = "tensor",
    ) -> Request:
        """A request from the forms people type: ``seeds`` one int or any iterable of ints (a range),
        ``size`` (height, width) or one side (default: the training resolution), ``plan`` a SkipPlan,
        rule or preset text (``"2@0.6:1"``, ``"global@0.6"``, a list of them) or None (the full stack);
        churn as a :class:`Churn` or its four numbers.  Integers of numpy or torch are accepted.
        """
        if not isinstance(config, LegoConfig):
            raise UsageError(f"config: expected the model's LegoConfig (model.config), got {config!r}")
        expected = "ints in [0, 2**32)"
        if not _is_int(seeds) and hasattr(seeds, "__len__"):
            _check_count(len(seeds))  # before a list of them is built
        seed_list = (
            (_as_int(seeds, "seeds", expected),)
            if _is_int(seeds)
            else tuple(_as_int(s, "seeds", expected) for s in _as_list(seeds, "seeds", expected))
        )
        if not seed_list:
            raise UsageError("seeds: pass at least one seed")
        class_expected = f"ints in [0, {config.label_dim})"
        if _is_int(classes):
            classes = _as_int(classes, "classes", class_expected)
        elif classes is not None:
            classes = tuple(_as_int(c, "classes", class_expected) for c in _as_list(classes, "classes", class_expected))
        size_expected = "(height, width) ints or one int"
        if size is None:
            height = width = config.resolution
        elif _is_int(size):
            height = width = _as_int(size, "size", size_expected)
        else:
            sides = _as_list(size, "size", size_expected)
            if len(sides) != 2:
                raise UsageError(f"size: expected {size_expected}, got {size!r}")
            height, width = (_as_int(v, "size", size_expected) for v in sides)
        if churn is None:
            churn = Churn(S_churn, S_min, S_max, S_noise)
        elif (S_churn, S_min, S_max, S_noise) != (0.0, 0.0, math.inf, 1.0):
            raise UsageError("pass churn=Churn(...) or the S_churn/S_min/S_max/S_noise numbers, not both")
        return cls(
            config=config,
            seeds=seed_list,
            height=height,
            width=width,
            classes=classes,
            plan=SkipPlan.of(plan, config),
            cfg_scale=cfg_scale,
            steps=steps,
            solver=solver,
            churn=churn,
            batch=batch,
            output=output,
        )

    def only(self, seeds: Iterable[int]) -> Request:
        """This request for a subset of its seeds, in the given order (with their classes): a resume's remainder,
        a rank's share; it may be empty (sampling it gives no images).  Every setting is this request's own, so
        nothing is checked again but the subset."""
        if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
            raise UsageError(f"only: expected an iterable of this request's seeds, got {type(seeds).__name__}")
        chosen = tuple(seeds)
        index = {s: i for i, s in enumerate(self.seeds)}
        missing = [s for s in chosen if not _is_int(s) or s not in index]
        if missing:
            raise UsageError(f"seed {missing[0]!r} is not one of this request's seeds")
        seen: set[int] = set()
        for s in chosen:  # one pass: a remainder may hold a million seeds
            if s in seen:
                raise UsageError(f"seed {s} is given twice; each seed makes one image")
            seen.add(s)
        new = object.__new__(Request)
        for f in self.__dataclass_fields__:
            object.__setattr__(new, f, getattr(self, f))
        object.__setattr__(new, "seeds", chosen)
        if isinstance(self.classes, tuple):
            object.__setattr__(new, "classes", tuple(self.classes[index[s]] for s in chosen))
        return new

    # ------------------------------------------------------------------ what it means
    @property
    def guided(self) -> bool:
        return self.cfg_scale is not None

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width

    def batches(self, size: int) -> list[tuple[tuple[int, ...], int | tuple[int, ...] | None]]:
        """The seeds in batches of at most ``size`` (``batch`` when the request names one), each with its classes."""
        if not self.seeds:  # a resume's remainder with nothing left
            return []
        size = self.batch or size
        out = []
        for i in range(0, len(self.seeds), size):
            seeds = self.seeds[i : i + size]
            classes = self.classes[i : i + size] if isinstance(self.classes, tuple) else self.classes
            out.append((seeds, classes))
        return out

    def batch_sizes(self, size: int) -> list[int]:
        """The batch sizes an engine profile must take: those :meth:`batches` gives, and ``batch`` when named
        (a run's batch, so that a resume with fewer seeds left is refused the same way as the first run)."""
        return sorted({len(seeds) for seeds, _ in self.batches(size)} | ({self.batch} if self.batch else set()))

    def check_memory(self, default_batch: int, *, available: int | None = None, where: str = "") -> None:
        """Refuse (ShapeError) a request whose largest batch's activations alone exceed ``available`` bytes
        (default: the host's MemAvailable), before any compute: the eager model and the Generator both ask."""
        sizes = self.batch_sizes(default_batch)
        if not sizes:  # a resume's remainder with nothing left to sample
            return
        rows = max(sizes) * (2 if self.guided else 1)
        check_memory(self.config, self.height, self.width, rows, available=available, where=where)

    def describe(self) -> str:
        """The plan's step table and relative cost (what every command prints before it samples)."""
        return self.plan.describe(self.config, self.steps, self.solver, self.height, self.width)

    def settings(self) -> dict[str, Any]:
        """What decides a seed's pixels besides its seed, weights and precision, as JSON values (run.json)."""
        if isinstance(self.classes, tuple):
            classes: Any = {"per seed": [[s, c] for s, c in zip(self.seeds, self.classes)]}
        else:
            classes = "random" if self.classes is None else self.classes
        return {
            "model": self.config.name,
            "config": self.config.to_dict(),
            "size": f"{self.height}x{self.width}",
            "steps": self.steps,
            "solver": self.solver,
            "class": classes,
            "guidance": "off" if self.cfg_scale is None else self.cfg_scale,
            # Without churn the S_min/S_max/S_noise values do not reach the images.
            "churn": self.churn.kwargs() if self.churn.on else "off",
            "bricks per step": [list(a) for a in self.active],
        }


# An open_batch(labels, batch) block yields the denoiser of one batch (the eager model's or a runtime chain's);
# it may check the batch's outputs when it closes (NaN/Inf) and raise then.
OpenBatch = Callable[[Tensor | None, int], AbstractContextManager[Denoiser]]


def make_randn_like(rnd: StackedRandomGenerator, device: torch.device, churn: bool) -> Callable[[Tensor], Tensor]:
    """Per-seed noise for the sampler's churn, drawn on the CPU generators (the authors' streams).

    Without churn the sampler multiplies the noise by 0, so zeros give the same
    images without drawing (and without a host-to-device copy per step).
    """
    if not churn:
        return torch.zeros_like
    if device.type == "cpu":
        return rnd.randn_like
    return lambda x: rnd.randn(x.shape, dtype=x.dtype).to(x.device, non_blocking=True)


def sample_batches(
    request: Request,
    open_batch: OpenBatch,
    *,
    device: torch.device,
    default_batch: int,
    on_step: Callable[[int], None] | None = None,
    sampler: Callable[..., Tensor] = edm_sample,
) -> Iterator[tuple[tuple[int, ...], Tensor]]:
    """Sample ``request`` batch by batch: (seeds, float64 [n, C, H, W] on ``device``) per batch.

    The one sampling loop of the project: latents and labels per seed
    (``draw_latents``), the batch's denoiser from ``open_batch``, and
    ``edm_sample`` with the request's schedule, plan and churn.  A latent
    model's result is its latents; decoding is the caller's.  ``on_step(i)``
    is called after each sampling step of each batch.  ``sampler`` takes
    ``edm_sample``'s arguments; the runtime passes its chain's whole-run entry
    point (``BrickChain.sample``, one CUDA graph per run on a GPU), the same program.
    """
    check_on_step(on_step)
    cfg = request.config
    for seeds, classes in request.batches(default_batch):
        latents, labels, rnd = draw_latents(seeds, cfg.img_channels, request.height, request.width, cfg.label_dim,
                                            classes)  # fmt: skip
        try:
            with open_batch(labels, len(seeds)) as denoise:
                images = sampler(
                    denoise,
                    latents.to(device),
                    num_steps=request.steps,
                    solver=request.solver,
                    randn_like=make_randn_like(rnd, device, request.churn.on),
                    active_per_step=request.active,
                    on_step=on_step,
                    **request.churn.kwargs(),
                )
        except RuntimeError as err:  # the memory check is a lower bound: what passed it may still not fit
            if not _out_of_memory(err):
                raise
            raise ShapeError(
                f"{len(seeds)} canvases of {request.height}x{request.width} ran out of memory on {device} "
                f"({first_line(err)}); sample fewer seeds per batch (batch=, --batch) or a smaller size"
            ) from None
        yield seeds, images


def runs_guided(cfg_scale: float | None) -> bool:
    """Whether a request of this guidance scale runs guided rows: not for None, nor for scale 1, which is no
    guidance (f_null + 1 * (f_cond - f_null) = f_cond): unguided, on half the rows, batches as large as without."""
    return cfg_scale is not None and cfg_scale != 1.0


def concat_batches(request: Request, batches: Iterable[tuple[tuple[int, ...], Tensor]], device: torch.device) -> Tensor:
    """The results of :func:`sample_batches` in one tensor: float64 [0, C, H, W] for a request of no seeds."""
    parts = [images for _, images in batches]
    if parts:
        return torch.cat(parts)
    cfg = request.config
    return torch.empty(0, cfg.img_channels, request.height, request.width, dtype=torch.float64, device=device)


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is an allocator's refusal (torch's CUDA OutOfMemoryError, or the CPU allocator's)."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def check_on_step(on_step: object) -> None:
    """Refuse an ``on_step`` that is neither None nor callable (before any compute, wherever one is passed)."""
    if on_step is not None and not callable(on_step):
        raise UsageError(f"on_step must be a callable taking the step index, got {on_step!r}")
    if on_step is not None:
        try:
            signature = inspect.signature(on_step)
        except (TypeError, ValueError):  # a builtin or extension callable without one: its call will tell
            return
        try:
            signature.bind(0)
        except TypeError:
            raise UsageError(f"on_step must take one argument, the step index; {on_step!r} takes {signature}") from None


def _is_int(value: object) -> bool:
    """An integer (Python, numpy or a 0-dim integer tensor), not a bool."""
    if isinstance(value, bool):
        return False
    if isinstance(value, Tensor):
        return value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _check_count(count: int) -> None:
    """At most :data:`lego_model.images.MAX_SEEDS` seeds per request, as ``--seeds`` takes."""
    if count > MAX_SEEDS:
        raise UsageError(
            f"seeds: {count} seeds is more than the limit of {MAX_SEEDS}; split them into several requests"
        )


def _as_int(value: object, name: str, expected: str) -> int:
    if not _is_int(value):
        raise UsageError(f"{name}: expected {expected}, got {value!r}")
    return operator.index(value)


def _as_list(value: object, name: str, expected: str) -> list:
    if isinstance(value, (str, bytes)):
        raise UsageError(f"{name}: expected {expected}, got {value!r}")
    try:
        return list(value)
    except TypeError:
        raise UsageError(f"{name}: expected {expected}, got {value!r}") from None


__all__ = ["OUTPUTS", "Churn", "OpenBatch", "Output", "Request", "check_on_step", "make_randn_like", "sample_batches"]
