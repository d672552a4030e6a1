"""EDM preconditioning, canvas coordinates, guidance and the brick chain.

One denoiser call D(x; sigma, y) with active bricks A (shared/DESIGN.md):

    cond = embed(c_noise(sigma), y)
    x_in = concat(c_in(sigma) * x, coords)
    f = 0;  for k in A: f = brick_k(x_in, f, cond)
    D = c_skip(sigma) * x + c_out(sigma) * f

The preconditioning is Karras et al. 2022 (EDM), Table 1, with sigma_data = 0.5.
Everything here is float32, as in the authors' EDMPrecondLEGO.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lego_model.configs import LegoConfig
from lego_model.errors import ShapeError


def edm_scalings(sigma: Tensor, sigma_data: float = 0.5) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) for sigma of shape [B]; the first three come back as [B, 1, 1, 1]."""
    s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + s**2).sqrt()
    c_noise = s.log().flatten() / 4
    return c_skip, c_out, c_in, c_noise


def canvas_coords(height: int, width: int, device: torch.device | str | None = None) -> Tensor:
    """Two channels in [-1, 1] over the whole canvas, row coordinate first: shape (1, 2, H, W).

    For square canvases this is the authors' layout; they normalise by (side - 1),
    so a side of 1 pixel is not allowed.
    """
    # (i / (n - 1) - 0.5) * 2, in the authors' order of operations, so that the float32 values agree bit for bit.
    rows = (torch.arange(height, dtype=torch.float32, device=device) / (height - 1) - 0.5) * 2
    cols = (torch.arange(width, dtype=torch.float32, device=device) / (width - 1) - 0.5) * 2
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))  # (2, H, W)
    return grid.unsqueeze(0)


def model_input(x: Tensor, c_in: Tensor, coords: Tensor) -> Tensor:
    """x_in = concat(c_in * x, coords): (B, C+2, H, W) in float32."""
    scaled = c_in * x.to(torch.float32)
    return torch.cat([scaled, coords.expand(x.shape[0], -1, -1, -1)], dim=1)


def guide(f: Tensor, cfg_scale: float) -> Tensor:
    """Classifier-free guidance on f; rows are [cond; null]: f_null + s * (f_cond - f_null)."""
    f_cond, f_null = f.chunk(2, dim=0)
    return f_null + cfg_scale * (f_cond - f_null)


def guidance_labels(class_labels: Tensor) -> Tensor:
    """[cond; null] label rows for a guided call: the null label is the all-zero vector."""
    return torch.cat([class_labels, torch.zeros_like(class_labels)], dim=0)


def check_active(active: Sequence[int], num_bricks: int) -> tuple[int, ...]:
    """Sorted, de-duplicated active set; at least one brick, all in range."""
    act = tuple(sorted(set(int(k) for k in active)))
    if not act:
        raise ShapeError("at least one brick must run in every denoiser call")
    if act[0] < 0 or act[-1] >= num_bricks:
        raise ShapeError(f"active bricks {list(act)} out of range: this model has bricks 0..{num_bricks - 1}")
    return act


def denoise_with_bricks(
    embed: Callable[[Tensor, Tensor | None], Tensor],
    bricks: Sequence[Callable[[Tensor, Tensor | None, Tensor], Tensor]],
    x: Tensor,
    sigma: Tensor,
    *,
    config: LegoConfig,
    class_labels: Tensor | None = None,
    active: Sequence[int] | None = None,
    cfg_scale: float | None = None,
) -> Tensor:
    """One denoiser call through any embedder and bricks (eager modules or engine runners).

    x: (B, C, H, W) any float dtype; sigma: (B,) or scalar; class_labels: (B, label_dim)
    one-hot or None (null label); returns D in float32.
    """
    B, C, H, W = x.shape
    config.check_image_size(H, W)
    act = check_active(range(len(bricks)) if active is None else active, len(bricks))
    sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).expand(B).contiguous()
    x32 = x.to(torch.float32)
    if config.label_dim:
        labels = torch.zeros(B, config.label_dim, device=x.device) if class_labels is None else class_labels
        labels = labels.to(torch.float32)
    elif class_labels is not None:
        raise ShapeError(f"{config.name} is unconditional: sample without class labels")
    else:
        labels = None
    guided = cfg_scale is not None
    if guided and labels is None:
        raise ShapeError(f"{config.name} is unconditional: classifier-free guidance needs a class-conditional model")

    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, config.sigma_data)
    x_in = model_input(x32, c_in, canvas_coords(H, W, device=x.device))  # (B, C+2, H, W)
    if guided:
        x_in = torch.cat([x_in, x_in], dim=0)  # rows [cond; null]
        c_noise = torch.cat([c_noise, c_noise], dim=0)
        labels = guidance_labels(labels)
    cond = embed(c_noise, labels)  # (B', D)
    f = torch.zeros_like(x_in[:, :C])
    for k in act:
        f = bricks[k](x_in, f if k > 0 else None, cond)  # (B', C, H, W)
    f = f.to(torch.float32)
    if guided:
        f = guide(f, cfg_scale)
    return c_skip * x32 + c_out * f
