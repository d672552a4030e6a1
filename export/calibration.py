"""Calibration inputs of int8 engines: what each brick sees along the model's own sampling trajectories.

Post-training quantization fixes the int8 range of every quantized activation
from sample inputs, so those inputs must be the ones the engines meet when they
sample: ranges measured on anything else clip real activations (or spend the
256 steps on values that never occur).  A brick's inputs change along the EDM
schedule -- ``x_in`` is c_in(sigma) * x, which goes from pure noise at
sigma = 80 to a nearly clean image at sigma = 0.002, and ``f_prev`` and
``cond`` follow -- and between conditional and null-label rows of
classifier-free guidance.  :func:`record_calibration` therefore runs EDM Heun
sampling (the schedule and per-seed latents of ``lego_model.sampler``) with the
eager model, once with guidance (rows [cond; null]) and once without, over
several classes, and keeps every brick's inputs of the first denoiser call of
every step: every noise level of the schedule.  (Heun's second evaluation of a
step runs at the next step's noise level, where that step's first call also
runs; keeping it would double the quantizer's work for no new noise level.)

Everything is seeded (the latents, the classes, the model itself is fixed and
runs eagerly in float32 on the CPU), so two exports record the same tensors and
the quantizer, which is deterministic given its inputs, writes the same bytes.

Skip plans change what a brick reads as ``f_prev`` (zeros, or an earlier
brick's output); the trajectories run the full stack, whose ``f_prev`` covers
the ranges of the earlier bricks' outputs, and zeros lie inside every range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lego_model.model import LegoModel
from lego_model.precond import denoise_with_bricks
from lego_model.sampler import draw_latents, edm_sample

Feed = dict[str, np.ndarray]  # one engine call's named float32 inputs


@dataclass(frozen=True)
class CalibrationSettings:
    """Which trajectories calibrate an int8 export (the defaults are what lego-export uses).

    ``images`` trajectories per guidance mode (guided with ``cfg_scale`` and,
    for class-conditional models, unguided), ``num_steps`` EDM Heun steps each
    (one recorded call per step), at the training resolution.  Seed i samples class i mod label_dim: the guided
    and the unguided trajectories take different classes.
    """

    images: int = 2
    num_steps: int = 18
    cfg_scale: float = 2.0  # the demo's guidance scale (README, make demo)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.images < 1 or self.num_steps < 1:
            raise ValueError("calibration needs at least one image and one step")


@dataclass
class Calibration:
    """Recorded brick inputs: per engine name ("brick0", ...) one feed per recorded denoiser call, in call order."""

    feeds: dict[str, list[Feed]] = field(default_factory=dict)
    sigmas: list[float] = field(default_factory=list)  # noise level of each recorded call, in order
    rows: dict[str, int] = field(default_factory=dict)  # "guided" / "unguided": engine rows per call

    def describe(self) -> str:
        """One line for the export log: calls, rows, noise levels."""
        rows = ", ".join(f"{n} {kind}" for kind, n in self.rows.items())
        return (
            f"{len(self.sigmas)} denoiser calls (engine rows per call: {rows}), "
            f"sigma {min(self.sigmas):.3g} .. {max(self.sigmas):.3g}"
        )


def record_calibration(model: LegoModel, settings: CalibrationSettings | None = None) -> Calibration:
    """Sample with ``model`` and keep every brick's inputs at the first call of every step (module docstring)."""
    settings = settings or CalibrationSettings()
    model = model.eval()
    cfg = model.config
    r = cfg.resolution
    calibration = Calibration(feeds={f"brick{k}": [] for k in range(cfg.num_bricks)})
    recording = [False]  # whether the denoiser call in progress is recorded

    def recorded(k: int) -> Callable[[Tensor, Tensor | None, Tensor], Tensor]:
        brick = model.bricks[k]

        def run(x_in: Tensor, f_prev: Tensor | None, cond: Tensor) -> Tensor:
            if recording[0]:
                feed = {"x_in": x_in, **({"f_prev": f_prev} if k > 0 else {}), "cond": cond}
                calibration.feeds[f"brick{k}"].append({n: t.float().numpy().copy() for n, t in feed.items()})
            return brick(x_in, f_prev, cond)

        return run

    bricks = [recorded(k) for k in range(cfg.num_bricks)]
    modes = [("guided", settings.cfg_scale), ("unguided", None)] if cfg.label_dim else [("unguided", None)]
    for m, (kind, cfg_scale) in enumerate(modes):
        first = settings.seed + m * settings.images
        seeds = list(range(first, first + settings.images))
        classes = [seed % cfg.label_dim for seed in seeds] if cfg.label_dim else None
        latents, labels, rnd = draw_latents(seeds, cfg.img_channels, r, r, cfg.label_dim, classes)
        levels: set[float] = set()

        def denoise(
            x: Tensor, sigma: Tensor, active: tuple[int, ...], labels=labels, cfg_scale=cfg_scale, levels=levels
        ):
            level = float(sigma[0])
            recording[0] = level not in levels  # the first call at each noise level
            if recording[0]:
                levels.add(level)
                calibration.sigmas.append(level)
            return denoise_with_bricks(
                model.embed, bricks, x, sigma, config=cfg, class_labels=labels, active=active, cfg_scale=cfg_scale
            )

        with torch.no_grad():
            edm_sample(
                denoise,
                latents,
                num_steps=settings.num_steps,
                all_bricks=tuple(range(cfg.num_bricks)),
                randn_like=rnd.randn_like,
            )
        calibration.rows[kind] = 2 * len(seeds) if cfg_scale is not None else len(seeds)
    return calibration
