"""FLOPs of one denoiser call, counted from the layer shapes (2 FLOPs per multiply-add).

Element-wise work (LayerNorm, GELU, softmax, modulation) is left out: it is a
few percent of the matrix multiplies for every registered config.
"""

from __future__ import annotations

from lego_model.configs import LegoConfig


def brick_flops(config: LegoConfig, k: int, height: int, width: int, batch: int = 1) -> int:
    """FLOPs of brick k on a batch of H x W canvases."""
    D, C = config.hidden_size, config.img_channels
    r, p, depth = config.brick_sizes[k], config.patch_sizes[k], config.depths[k]
    c_in = C + 2 + (C if k > 0 else 0)
    hidden_mlp = int(D * config.mlp_ratio)
    tokens_per_tile = (r // p) ** 2
    tokens = (height // p) * (width // p)
    per_token = 2 * c_in * p * p * D  # patch embedding
    per_token += depth * (2 * D * 3 * D + 2 * 2 * tokens_per_tile * D + 2 * D * D + 2 * 2 * D * hidden_mlp)
    per_token += 2 * D * p * p * C  # final linear
    per_sample = depth * 2 * D * 6 * D + 2 * D * 2 * D  # adaLN modulation, once per image
    return batch * (tokens * per_token + per_sample)


def embedder_flops(config: LegoConfig, batch: int = 1) -> int:
    D = config.hidden_size
    return batch * (2 * 256 * D + 2 * D * D + 2 * config.label_dim * D)


def denoiser_flops(
    config: LegoConfig, height: int, width: int, active: tuple[int, ...] | None = None, batch: int = 1
) -> int:
    """FLOPs of one denoiser call D(x; sigma) with the given active bricks (all when None)."""
    act = range(config.num_bricks) if active is None else active
    return embedder_flops(config, batch) + sum(brick_flops(config, k, height, width, batch) for k in act)
