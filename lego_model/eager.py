"""Eager sampling of a list of seeds with the reference model: the path every engine backend is compared with."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lego_model.errors import NonFiniteError
from lego_model.model import LegoModel
from lego_model.sampler import NonFiniteWatch, draw_latents, edm_sample, step_of_call
from lego_model.skip import SkipPlan


def nonfinite_weight(module: nn.Module) -> str | None:
    """Name of the first parameter or buffer of ``module`` holding NaN/Inf, or None (one pass over the weights)."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                return name
    return None


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
    whatever the caller's grad mode.  A denoiser output holding NaN/Inf raises
    :class:`NonFiniteError` naming the sampling step (recorded on the device,
    read once at the end, as the runtime chain does).
    """
    cfg = model.config
    cfg.check_image_size(height, width)
    cfg.check_guidance(cfg_scale)
    plan = plan or SkipPlan(cfg.num_bricks)
    steps = plan.steps(num_steps)
    latents, labels, rnd = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim, class_idx)

    watch = NonFiniteWatch(1, latents.device)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, active: tuple[int, ...]) -> torch.Tensor:
        d = model(x, sigma, labels, active, cfg_scale)
        watch.next_call()
        watch.record(0, d)
        return d

    with torch.no_grad():
        images = edm_sample(
            denoise,
            latents,
            num_steps=num_steps,
            solver=solver,
            randn_like=rnd.randn_like,
            active_per_step=steps,
            **churn,
        )
    found = watch.first()
    if found is not None:
        step = step_of_call(found[0], num_steps, solver)  # type: ignore[arg-type]
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        head = f"the eager model ({cfg.name}, {dtype}) produced NaN/Inf at sampling step {step} of {num_steps}"
        weight = nonfinite_weight(model)
        if weight is not None:
            raise NonFiniteError(
                f"{head}: its weight {weight} holds NaN/Inf; the checkpoint is damaged, use another one"
            )
        suspects = ["weights of extreme magnitude (check the checkpoint)"]
        if cfg_scale is not None and cfg_scale > 1:
            suspects.append(f"the guidance scale {cfg_scale:g} (lower --cfg-scale)")
        if churn.get("S_churn"):
            suspects.append("the churn settings")
        raise NonFiniteError(f"{head}: the weights are finite, so float overflowed; suspects: {', '.join(suspects)}")
    return images
