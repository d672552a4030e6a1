"""Eager sampling of a list of seeds with the reference model: the path every engine backend is compared with."""

from __future__ import annotations

import torch

from lego_model.errors import LegoError
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
    class_idx: int | None = None,
    cfg_scale: float | None = None,
    plan: SkipPlan | None = None,
    **churn: float,
) -> torch.Tensor:
    """Eager sampling of one batch of seeds; returns float64 images in [-1, 1]."""
    cfg = model.config
    cfg.check_image_size(height, width)
    plan = plan or SkipPlan(cfg.num_bricks)
    steps = plan.steps(num_steps)
    latents, labels, rnd = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim, class_idx)
    if cfg_scale is not None and not cfg.label_dim:
        raise LegoError(f"{cfg.name} is unconditional: leave out --cfg-scale")

    def denoise(x: torch.Tensor, sigma: torch.Tensor, active: tuple[int, ...]) -> torch.Tensor:
        return model(x, sigma, labels, active, cfg_scale)

    with torch.inference_mode():
        return edm_sample(
            denoise,
            latents,
            num_steps=num_steps,
            solver=solver,
            randn_like=rnd.randn_like,
            active_per_step=steps,
            **churn,
        )
