"""EDM sampler (Karras et al. 2022, Algorithm 2) driven by any denoiser callable.

The sampler never imports bricks: the eager model and every runtime backend
pass a :class:`Denoiser`, ``denoise(x, sigma, active) -> D``, where ``active``
is the brick set the skip plan chose for that step.  Schedule, churn and
per-seed noise follow the authors' generate.py (edm_lego_sampler,
StackedRandomGenerator) so that the same seeds give the same images; their
known faults are not reproduced: skipped bricks are really not computed, the
skip holds under guidance too, and any brick can be skipped at any step.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

from lego_model.configs import check_class_index
from lego_model.errors import LegoError, ShapeError

Solver = Literal["heun", "euler"]
SOLVERS: tuple[Solver, ...] = ("heun", "euler")  # EDM's 2nd-order Heun (Algorithm 1/2) and its 1st-order Euler

SEED_RANGE = 1 << 32  # seeds are 0 .. 2^32 - 1, as the authors' StackedRandomGenerator takes them
# torch.Generator.manual_seed takes 0 .. 2^64 - 1 (training and --random-init seeds); a negative seed aliases 2^64 + it.
TORCH_SEED_MAX = (1 << 64) - 1
MAX_STEPS = 1000  # sampling steps; EDM needs 18-256, and per-step lists (skip plans, run records) stay small


class Denoiser(Protocol):
    """D(x; sigma) with the given active bricks; x is float64 [B, C, H, W], sigma float64 [B]."""

    def __call__(self, x: Tensor, sigma: Tensor, active: tuple[int, ...]) -> Tensor: ...


class StackedRandomGenerator:
    """One ``torch.Generator`` per seed, so that each image depends on its seed alone.

    Draws happen per seed in the authors' order: latents, then class labels,
    then one churn draw per step.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        # The authors reduce seeds modulo 2^32, so that seed 2^32 silently gives seed 0's image: refuse instead.
        bad = [int(s) for s in seeds if not 0 <= int(s) < SEED_RANGE]
        if bad:
            raise LegoError(f"seed {bad[0]} is out of range: seeds run from 0 to {SEED_RANGE - 1} (2^32 - 1)")
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32, device=None) -> Tensor:
        assert size[0] == len(self.generators)
        return torch.stack(
            [torch.randn(tuple(size[1:]), generator=g, dtype=dtype, device=device) for g in self.generators]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size: Sequence[int], device=None) -> Tensor:
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(high, tuple(size[1:]), generator=g, device=device) for g in self.generators])


def draw_latents(
    seeds: Sequence[int],
    img_channels: int,
    height: int,
    width: int,
    label_dim: int = 0,
    class_idx: int | Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor | None, StackedRandomGenerator]:
    """Per-seed latents [B, C, H, W] and one-hot labels [B, label_dim] (None when unconditional).

    ``class_idx``: None (a random class per seed), one class for every seed,
    or one class per seed.  Random labels are drawn even when ``class_idx``
    fixes them, as the authors do, so that the churn draws that follow stay
    aligned with theirs (and an image depends on its seed and class alone).
    """
    per_seed = class_idx is not None and not isinstance(class_idx, int)
    if per_seed:
        class_idx = [int(c) for c in class_idx]
        if len(class_idx) != len(seeds):
            raise ShapeError(f"classes: {len(class_idx)} given for {len(seeds)} seeds; pass one per seed or one int")
        for c in class_idx:
            check_class_index("this model", label_dim, c)
    else:
        check_class_index("this model", label_dim, class_idx)
    rnd = StackedRandomGenerator(seeds, device)
    latents = rnd.randn([len(seeds), img_channels, height, width], device=device)
    labels = None
    if label_dim:
        idx = rnd.randint(label_dim, size=[len(seeds)], device=device)
        if per_seed:
            idx = torch.tensor(class_idx, dtype=idx.dtype, device=idx.device)
        elif class_idx is not None:
            idx = torch.full_like(idx, class_idx)
        labels = torch.eye(label_dim, device=device)[idx]
    return latents, labels, rnd


def check_churn(S_churn: float, S_min: float, S_max: float, S_noise: float) -> None:
    """Refuse churn settings that would turn every image into NaN (NaN, negative or infinite amounts).

    A large finite ``S_churn`` is accepted: EDM caps the per-step gamma at
    sqrt(2) - 1, so every ``S_churn >= 0.42 * steps`` samples alike.
    """
    if not (math.isfinite(S_churn) and S_churn >= 0):
        raise LegoError(f"S_churn {S_churn} must be a finite number >= 0 (--S-churn; 0 = deterministic)")
    if math.isnan(S_min) or math.isnan(S_max) or S_min < 0 or S_max < S_min:
        raise LegoError(
            f"churn range S_min {S_min} .. S_max {S_max} must satisfy 0 <= S_min <= S_max (--S-min/--S-max)"
        )
    if not math.isfinite(S_noise):
        raise LegoError(f"S_noise {S_noise} must be a finite number (--S-noise; EDM uses 1.0 to 1.007)")


def edm_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """t_0 > ... > t_{N-1} = sigma_min, then t_N = 0, in float64 (EDM Eq. 5)."""
    if not 1 <= num_steps <= MAX_STEPS:
        raise LegoError(f"{num_steps} sampling steps: use 1 to {MAX_STEPS}")
    i = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


def evaluations_per_step(num_steps: int, solver: Solver) -> list[int]:
    """Denoiser calls per step: Heun corrects every step but the last (t_N = 0)."""
    if solver == "euler":
        return [1] * num_steps
    return [2] * (num_steps - 1) + [1]


def step_of_call(call: int, num_steps: int, solver: Solver) -> int:
    """Sampling step (0-based) of the ``call``-th denoiser call (1-based) of an EDM run."""
    for step, total in enumerate(itertools.accumulate(evaluations_per_step(num_steps, solver))):
        if call <= total:
            return step
    return num_steps - 1


class NonFiniteWatch:
    """Device-side record, per watched output, of the first denoiser call at which it held NaN or Inf.

    Recording needs no host synchronisation (and can be captured into a CUDA
    graph: the tensors are created once and updated in place); :meth:`first`
    reads the record once, when the caller chooses.  The runtime chain watches
    each engine's output, the eager sampler each denoiser output.
    """

    def __init__(self, slots: int, device: torch.device | str) -> None:
        self.calls = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((slots,), -1, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.calls.zero_()
        self.first_bad.fill_(-1)

    def next_call(self) -> None:
        """Count one denoiser call (call numbers start at 1)."""
        self.calls.add_(1)

    def record(self, slot: int, out: Tensor) -> None:
        """Note the current call for ``slot`` if ``out`` holds NaN/Inf and nothing was noted before."""
        first = self.first_bad[slot]
        bad = ~torch.isfinite(out).all()
        first.copy_(torch.where(bad & (first < 0), self.calls, first))

    def first(self) -> tuple[int, int] | None:
        """(call, slot) of the earliest non-finite output (lowest slot on ties), or None; reads the device."""
        found = [(call, slot) for slot, call in enumerate(self.first_bad.tolist()) if call >= 0]
        return min(found) if found else None


@torch.no_grad()  # inference: no autograd graph through 2N denoiser calls, whatever the caller's grad mode
def edm_sample(
    denoise: Denoiser,
    latents: Tensor,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    solver: Solver = "heun",
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    randn_like: Callable[[Tensor], Tensor] = torch.randn_like,
    active_per_step: Sequence[tuple[int, ...]] | None = None,
    all_bricks: tuple[int, ...] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> Tensor:
    """Sample from ``latents`` (unit-variance noise); returns float64 images in [-1, 1] units.

    ``active_per_step[i]`` is the brick set of step i (a skip plan's
    ``steps(num_steps)``); without it every step uses ``all_bricks``.  One of
    the two is required: the sampler does not know how many bricks the
    denoiser has.  Runs under ``torch.no_grad()``: the result has no autograd
    history whatever the caller's grad mode.
    """
    if solver not in SOLVERS:
        raise LegoError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if active_per_step is None and not all_bricks:
        raise LegoError(
            "edm_sample needs the bricks to run: pass active_per_step (a SkipPlan's steps(num_steps)) "
            "or all_bricks (e.g. tuple(range(config.num_bricks)))"
        )
    if active_per_step is not None and len(active_per_step) != num_steps:
        raise LegoError(f"skip plan covers {len(active_per_step)} steps, sampler runs {num_steps}")
    check_churn(S_churn, S_min, S_max, S_noise)
    # Python floats (float64) keep the schedule on the host: no device sync per step.
    t_steps = edm_schedule(num_steps, sigma_min, sigma_max, rho).tolist()
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    ones = torch.ones(latents.shape[0], dtype=torch.float64, device=latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        active = all_bricks if active_per_step is None else tuple(active_per_step[i])
        x_cur = x_next

        # Churn: raise the noise level temporarily.  The noise is drawn at every
        # step, gamma = 0 included, to consume the per-seed generators as the authors do.
        gamma = gamma_max if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * randn_like(x_cur)

        # Euler step.
        denoised = denoise(x_hat, t_hat * ones, active).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order (Heun) correction, except at the last step where t_next = 0.
        if solver == "heun" and i < num_steps - 1:
            denoised = denoise(x_next, t_next * ones, active).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if on_step is not None:
            on_step(i)
    return x_next
