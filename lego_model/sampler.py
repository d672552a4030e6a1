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
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from lego_model.configs import check_class_index
from lego_model.errors import LegoError, ShapeError, UsageError

Solver = Literal["heun", "euler"]
SOLVERS: tuple[Solver, ...] = ("heun", "euler")  # EDM's 2nd-order Heun (Algorithm 1/2) and its 1st-order Euler

SEED_RANGE = 1 << 32  # seeds are 0 .. 2^32 - 1, as the authors' StackedRandomGenerator takes them
# torch.Generator.manual_seed takes 0 .. 2^64 - 1 (training and --random-init seeds); a negative seed aliases 2^64 + it.
TORCH_SEED_MAX = (1 << 64) - 1
MAX_STEPS = 1000  # sampling steps; EDM needs 18-256, and per-step lists (skip plans, run records) stay small
# Images per batch: the engines' batch profiles (export.records.PROFILE_LIMITS), --batch and Request.batch.
MAX_BATCH = 4096
# EDM's S_noise: 1.0 to 1.007 in Karras et al. (2022), Table 5.  Above 1 the churn adds more noise than the
# denoiser is told of (sqrt((1 + S_noise^2) / 2) times as much at the largest gamma).  The shipped digits model at
# the largest churn (S_churn 40, 18 Heun steps, 40 seeds) still draws digits at S_noise 2 (classifier accuracy 0.32,
# 0.82 at 1, chance 0.10) and none from 3 on (0.12 at 3 and 10; 1e30 writes saturated noise): the bound is 2.
MAX_S_NOISE = 2.0


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
    """Refuse churn settings that make no images: NaN, negative or infinite amounts, and an ``S_noise`` above
    :data:`MAX_S_NOISE` (the same bounds as the sample CLI's options).

    A large finite ``S_churn`` is accepted: EDM caps the per-step gamma at
    sqrt(2) - 1, so every ``S_churn >= 0.42 * steps`` samples alike.
    """
    if not (math.isfinite(S_churn) and S_churn >= 0):
        raise UsageError(f"S_churn {S_churn} must be a finite number >= 0 (--S-churn; 0 = deterministic)")
    if math.isnan(S_min) or math.isnan(S_max) or S_min < 0 or S_max < S_min:
        raise UsageError(
            f"churn range S_min {S_min} .. S_max {S_max} must satisfy 0 <= S_min <= S_max (--S-min/--S-max)"
        )
    if not 0 <= S_noise <= MAX_S_NOISE:  # NaN fails both comparisons
        raise UsageError(
            f"S_noise {S_noise} is outside 0..{MAX_S_NOISE:g} (--S-noise; EDM uses 1.0 to 1.007; more noise than "
            "the denoiser is told of makes no images)"
        )


def check_num_steps(num_steps: object) -> None:
    """Refuse a number of sampling steps that is not an int in 1..MAX_STEPS (a LegoError naming the range)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or not 1 <= num_steps <= MAX_STEPS:
        raise LegoError(f"{num_steps!r} sampling steps: use an int from 1 to {MAX_STEPS}")


def edm_schedule(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Tensor:
    """t_0 > ... > t_{N-1} = sigma_min, then t_N = 0, in float64 (EDM Eq. 5)."""
    check_num_steps(num_steps)
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

    def __init__(self, slots: int, device: torch.device | str, *, host_reads: bool | None = None) -> None:
        self.calls = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((slots,), -1, dtype=torch.int64, device=device)
        # Whether record() may read values on the host: by default on the CPU (where it costs nothing), never on a
        # GPU; a caller that knows better (the runtime chain, on a fake GPU made of CPU tensors) says so.
        self.host_reads = torch.device(device).type == "cpu" if host_reads is None else host_reads

    def reset(self) -> None:
        self.calls.zero_()
        self.first_bad.fill_(-1)

    def next_call(self) -> None:
        """Count one denoiser call (call numbers start at 1)."""
        self.calls.add_(1)

    def record(self, slot: int, out: Tensor) -> None:
        """Note the current call for ``slot`` if ``out`` holds NaN/Inf and nothing was noted before."""
        if self.host_reads:
            # One min/max pass (NaN propagates through both) read on the host costs a fraction of isfinite().all()
            # and a device-side update: 3 against 21 us per engine output of the shipped model at batch 16, 80
            # against 930 us at 16x3x128x128 (2-core Xeon), ~10% of the shipped model's OpenVINO bf16 call.
            low, high = torch.aminmax(out)
            if not (math.isfinite(low) and math.isfinite(high)) and self.first_bad[slot] < 0:
                self.first_bad[slot] = self.calls
            return
        first = self.first_bad[slot]
        bad = ~torch.isfinite(out).all()
        first.copy_(torch.where(bad & (first < 0), self.calls, first))

    def first(self) -> tuple[int, int] | None:
        """(call, slot) of the earliest non-finite output (lowest slot on ties), or None; reads the device."""
        found = [(call, slot) for slot, call in enumerate(self.first_bad.tolist()) if call >= 0]
        return min(found) if found else None


# Churn noise kept on the device for a whole run beyond this is drawn step by step instead (see SamplingLoop).
NOISE_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class _Step:
    """One step of a run, everything host-side fixed before the loop: coefficients, sigma rows, noise, bricks."""

    index: int
    active: tuple[int, ...]
    t_hat: float  # the raised noise level the step starts from (t_cur without churn)
    t_next: float
    h: float  # t_next - t_hat
    noise_scale: float  # sqrt(t_hat^2 - t_cur^2) * S_noise; 0 without churn at this step
    sigma_hat: Tensor  # [B] float64 rows of the sigma table, passed to the denoiser
    sigma_next: Tensor
    noise: Tensor | None  # this step's slot of the preloaded churn noise (None: no churn, or drawn per step)
    heun: bool  # second-order correction (Heun, every step but the last)


@dataclass(frozen=True)
class LoopSpec:
    """Everything an EDM run's program depends on besides its inputs (latents, churn noise): validated, hashable.

    Two runs of one spec run the same operations with the same coefficients, so a
    CUDA graph captured for one replays for the other (the runtime keys its
    whole-loop graphs by it).  Build it with :meth:`of`.
    """

    shape: tuple[int, ...]  # latents [B, C, H, W]
    num_steps: int
    solver: Solver
    sigma_min: float
    sigma_max: float
    rho: float
    S_churn: float
    S_min: float
    S_max: float
    S_noise: float
    active: tuple[tuple[int, ...], ...]  # per step

    @classmethod
    def of(
        cls,
        shape: Sequence[int],
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
        active_per_step: Sequence[Sequence[int]] | None = None,
        all_bricks: Sequence[int] | None = None,
    ) -> LoopSpec:
        """The spec of a run with :func:`edm_sample`'s arguments; refuses what edm_sample refuses."""
        if solver not in SOLVERS:
            raise LegoError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
        if active_per_step is None and not all_bricks:
            raise LegoError(
                "edm_sample needs the bricks to run: pass active_per_step (a SkipPlan's steps(num_steps)) "
                "or all_bricks (e.g. tuple(range(config.num_bricks)))"
            )
        check_num_steps(num_steps)
        if active_per_step is not None and len(active_per_step) != num_steps:
            raise LegoError(f"skip plan covers {len(active_per_step)} steps, sampler runs {num_steps}")
        check_churn(S_churn, S_min, S_max, S_noise)
        if active_per_step is None:
            active = (tuple(int(k) for k in all_bricks),) * num_steps
        else:
            active = tuple(tuple(int(k) for k in a) for a in active_per_step)
        return cls(
            shape=tuple(int(n) for n in shape), num_steps=int(num_steps), solver=solver,
            sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho), S_churn=float(S_churn),
            S_min=float(S_min), S_max=float(S_max), S_noise=float(S_noise), active=active,
        )  # fmt: skip

    def coefficients(self) -> tuple[float, list[tuple[float, float, float]]]:
        """(t_0, per step (t_hat, t_next, noise scale)), in the reference sampler's float64 host arithmetic."""
        t_steps = edm_schedule(self.num_steps, self.sigma_min, self.sigma_max, self.rho).tolist()
        gamma_max = min(self.S_churn / self.num_steps, math.sqrt(2) - 1)  # EDM caps gamma at sqrt(2) - 1
        coeffs = []
        for i in range(self.num_steps):
            t_cur, t_next = t_steps[i], t_steps[i + 1]
            gamma = gamma_max if self.S_min <= t_cur <= self.S_max else 0.0
            t_hat = t_cur + gamma * t_cur
            coeffs.append((t_hat, t_next, math.sqrt(t_hat**2 - t_cur**2) * self.S_noise))
        return t_steps[0], coeffs

    def churned_steps(self) -> list[int]:
        """Steps whose churn noise is used (a non-zero noise scale)."""
        return [i for i, (_, _, c) in enumerate(self.coefficients()[1]) if c != 0.0]

    def nbytes(self, noise_budget_bytes: int = NOISE_BUDGET_BYTES) -> int:
        """Memory a :class:`SamplingLoop` of this spec holds: five float64 images, the preloaded noise, sigmas."""
        image = math.prod(self.shape) * 8
        noise = len(self.churned_steps()) * image
        return 5 * image + (noise if noise <= noise_budget_bytes else 0) + self.num_steps * 2 * self.shape[0] * 8


class SamplingLoop:
    """One EDM run (Karras et al. 2022, Algorithm 2) as a program over buffers allocated once.

    Everything that does not change from image to image is fixed when the loop
    is built from its :class:`LoopSpec`: the schedule t_i and the churn
    coefficients as host floats, the per-call noise levels as a float64 device
    table (the [B] rows the denoiser receives), each step's active bricks, and
    the image-sized float64 buffers of the state.  :meth:`load` fills the
    inputs: the latents, and the churn noise drawn from the caller's
    ``randn_like`` before the loop, one draw per step in the authors' order (so
    the per-seed generators give the same numbers as a draw inside the loop
    would).  :meth:`run` is then the loop itself: every update is an
    ``out=``/in-place op on those buffers, with Python-float coefficients, in
    the operation order of the reference sampler, so it allocates nothing,
    never reads the device from the host, and can be captured into one CUDA
    graph (the denoiser must be capturable too); uncaptured, the eager model
    and every backend run the same code.

    Churn noise above ``noise_budget_bytes`` (huge canvases with churn on many
    steps) is not preloaded but drawn inside :meth:`run` step by step, which
    allocates there: such a loop reports ``capturable`` False.
    """

    @torch.inference_mode(False)  # buffers that later calls in and out of inference mode can write
    def __init__(
        self, spec: LoopSpec, *, device: torch.device | str = "cpu", noise_budget_bytes: int = NOISE_BUDGET_BYTES
    ) -> None:
        self.spec = spec
        shape, num_steps, B = spec.shape, spec.num_steps, spec.shape[0]
        self.shape, self.device = shape, torch.device(device)
        self.t0, coeffs = spec.coefficients()
        # The authors draw at every step, gamma = 0 included, so the draws of the steps before the last
        # churned one still advance the generators (load() draws them too).
        churned = spec.churned_steps()
        self.draws = churned[-1] + 1 if churned else 0
        self.preloaded = len(churned) * math.prod(shape) * 8 <= noise_budget_bytes

        def buffer() -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=self.device)

        self.latents = buffer()  # input: unit-variance noise
        self.x = buffer()  # the state x_i; holds the images after run()
        self.x_hat, self.denoised, self.d_cur = buffer(), buffer(), buffer()
        n_noise = len(churned) if self.preloaded else 0
        self.noise = torch.zeros(n_noise, *shape, dtype=torch.float64, device=self.device)
        self._slots = {i: j for j, i in enumerate(churned)} if self.preloaded else {}
        self._randn_like: Callable[[Tensor], Tensor] | None = None  # per-step draws when not preloaded
        sigmas = torch.tensor([[t_hat, t_next] for t_hat, t_next, _ in coeffs], dtype=torch.float64)
        self.sigmas = sigmas.to(self.device)[:, :, None].expand(num_steps, 2, B).contiguous()  # [N, 2, B]
        self.steps = [
            _Step(
                index=i,
                active=spec.active[i],
                t_hat=t_hat,
                t_next=t_next,
                h=t_next - t_hat,
                noise_scale=c,
                sigma_hat=self.sigmas[i, 0],
                sigma_next=self.sigmas[i, 1],
                noise=self.noise[self._slots[i]] if i in self._slots else None,
                heun=spec.solver == "heun" and i < num_steps - 1,
            )
            for i, (t_hat, t_next, c) in enumerate(coeffs)
        ]

    @property
    def capturable(self) -> bool:
        """Whether :meth:`run` is free of allocation and host work (all churn noise preloaded)."""
        return self.preloaded or self.draws == 0

    def load(self, latents: Tensor, randn_like: Callable[[Tensor], Tensor] = torch.randn_like) -> None:
        """Copy the latents in and draw the churn noise (one ``randn_like(x)`` per step, in step order).

        ``randn_like`` is called with a tensor of the run's shape, dtype (float64) and device, as the
        reference sampler calls it with x_i.  Draws that only advance the generators are discarded.
        """
        if tuple(latents.shape) != self.shape:
            raise ShapeError(f"latents of shape {tuple(latents.shape)} for a sampling loop of shape {self.shape}")
        with torch.inference_mode(False), torch.no_grad():
            self.latents.copy_(latents)
            if not self.preloaded:
                self._randn_like = randn_like
                return
            for i in range(self.draws):
                z = randn_like(self.x)
                if i in self._slots:
                    self.noise[self._slots[i]].copy_(z)

    @torch.no_grad()
    def run(self, denoise: Denoiser, on_step: Callable[[int], None] | None = None) -> Tensor:
        """The sampling loop from the loaded latents; returns the images buffer (float64, [-1, 1] units).

        Each update is the reference sampler's expression in the same float64
        operation order, written into the loop's buffers (the denoiser's
        output is copied at once, so it may be a buffer the next call overwrites).
        """
        x, x_hat, den, d_cur = self.x, self.x_hat, self.denoised, self.d_cur
        torch.mul(self.latents, self.t0, out=x)  # x_0 = latents * t_0
        for step in self.steps:
            # Churn: raise the noise level temporarily (x_hat = x + sqrt(t_hat^2 - t^2) * S_noise * z).
            if step.noise is not None:
                torch.mul(step.noise, step.noise_scale, out=x_hat)
                x_hat.add_(x)
            elif self._randn_like is not None and step.index < self.draws:  # over the noise budget: drawn here
                z = self._randn_like(x)
                torch.mul(z, step.noise_scale, out=x_hat)
                x_hat.add_(x)
            else:
                x_hat.copy_(x)
            # Euler step: d = (x_hat - D(x_hat; t_hat)) / t_hat; x_next = x_hat + (t_next - t_hat) * d.
            den.copy_(denoise(x_hat, step.sigma_hat, step.active))
            torch.sub(x_hat, den, out=d_cur)
            d_cur.div_(step.t_hat)
            torch.mul(d_cur, step.h, out=x)
            x.add_(x_hat)
            # Second-order (Heun) correction, except at the last step where t_next = 0:
            # x_next = x_hat + (t_next - t_hat) * (0.5 d + 0.5 d'), d' = (x_next - D(x_next; t_next)) / t_next.
            if step.heun:
                den.copy_(denoise(x, step.sigma_next, step.active))
                torch.sub(x, den, out=den)
                den.div_(step.t_next)
                den.mul_(0.5)
                d_cur.mul_(0.5).add_(den)
                d_cur.mul_(step.h)
                torch.add(x_hat, d_cur, out=x)
            if on_step is not None:
                on_step(step.index)
        return x


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
    denoiser has.  ``randn_like`` draws the churn noise (the per-seed
    generators' ``randn_like``), all of it before the first step.
    ``on_step(i)`` is called after step i.  Runs :class:`SamplingLoop`, the
    one implementation of the sampler, uncaptured, under ``torch.no_grad()``:
    the result has no autograd history whatever the caller's grad mode.
    """
    spec = LoopSpec.of(
        latents.shape,
        num_steps=num_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        solver=solver,
        S_churn=S_churn,
        S_min=S_min,
        S_max=S_max,
        S_noise=S_noise,
        active_per_step=active_per_step,
        all_bricks=all_bricks,
    )
    loop = SamplingLoop(spec, device=latents.device)
    loop.load(latents, randn_like)
    return loop.run(denoise, on_step)
