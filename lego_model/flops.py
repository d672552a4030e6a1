"""FLOPs of one denoiser call, counted from the layer shapes (2 FLOPs per multiply-add).

Element-wise work (LayerNorm, GELU, softmax, modulation) is left out: it is a
few percent of the matrix multiplies for every registered config.  What the
machine offers (available memory, usable cores) is read here too, for the
checks that refuse a run before it starts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from lego_model.configs import LegoConfig
from lego_model.errors import ShapeError
from lego_model.sampler import Solver, evaluations_per_step


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


def sampling_flops(
    config: LegoConfig, height: int, width: int, active_per_step: Sequence[tuple[int, ...]], solver: Solver
) -> int:
    """FLOPs of one image's sampling run: every denoiser call of every step with that step's bricks."""
    calls = evaluations_per_step(len(active_per_step), solver)
    return sum(n * denoiser_flops(config, height, width, act) for n, act in zip(calls, active_per_step))


def activation_bytes(config: LegoConfig, height: int, width: int, rows: int) -> int:
    """A rough lower bound on the eager forward's peak fp32 activations for ``rows`` canvases.

    Per token of the brick with the most tokens, what must be live at once:
    the residual stream and its normalised copy (2 D) and the wider of the
    MLP hidden layer and q, k, v (mlp_ratio D or 3 D).  Attention scores are
    left out (fused kernels need not hold them).
    """
    D = config.hidden_size
    tokens = max((height // p) * (width // p) for p in config.patch_sizes)
    return 4 * rows * tokens * (2 * D + max(int(config.mlp_ratio * D), 3 * D))


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory the kernel says new allocations can get (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(
    config: LegoConfig, height: int, width: int, rows: int, *, available: int | None = None, where: str = ""
) -> int:
    """Refuse (ShapeError) an eager batch whose activations alone exceed the available memory; returns the estimate.

    Without this a 4096x4096 batch runs into the allocator (a traceback) or the
    kernel's OOM killer after minutes; the estimate is a lower bound, so
    nothing that would fit is refused.  ``available``: the bytes to compare
    with (default: the host's MemAvailable), ``where`` names that memory in the
    message (e.g. " on cuda:0").
    """
    need = activation_bytes(config, height, width, rows)
    have = available_memory() if available is None else available
    if have is not None and need > have:
        raise ShapeError(
            f"{rows} canvases of {height}x{width} need at least {need / 2**30:.1f} GiB of activations, "
            f"{have / 2**30:.1f} GiB is available{where}; sample fewer seeds per run or a smaller size"
        )
    return need
