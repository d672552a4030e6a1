"""Eager sampling of a list of seeds with the reference model: the path every engine backend is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lego_model.model import LegoModel
from lego_model.sampler import draw_latents, edm_sample
from lego_model.skip import SkipPlan


def sample_images(
    model: LegoModel,
    seeds: list[int],
    *,
    height: int,
    width: int,
    num_steps: int = 18,
    solver: str = "heun",
    class_idx: int | Sequence[int] | None = None,
    cfg_scale: float | None = None,
    plan: SkipPlan | None = None,
    **churn: float,
) -> torch.Tensor:
    """Eager sampling of one batch of seeds; returns float64 images in [-1, 1].

    ``class_idx``: None (random per seed), one class, or one class per seed.

    Runs under ``torch.no_grad()`` (not inference mode, whose tensors cannot
    enter a later autograd computation): no autograd graph is recorded,
    whatever the caller's grad mode.
    """
    cfg = model.config
    cfg.check_image_size(height, width)
    cfg.check_guidance(cfg_scale)
    plan = plan or SkipPlan(cfg.num_bricks)
    steps = plan.steps(num_steps)
    latents, labels, rnd = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim, class_idx)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, active: tuple[int, ...]) -> torch.Tensor:
        return model(x, sigma, labels, active, cfg_scale)

    with torch.no_grad():
        return edm_sample(
            denoise,
            latents,
            num_steps=num_steps,
            solver=solver,
            randn_like=rnd.randn_like,
            active_per_step=steps,
            **churn,
        )
