"""Seeds lists and image files shared by the sampling commands."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lego_model.configs import refuse_unconditional
from lego_model.errors import LegoError
from lego_model.parsing import is_whole_number, parse_int, quoted
from lego_model.sampler import SEED_RANGE

# One PNG per seed, and every seed's latents in one list: a million seeds is 20x an FID-50k run.
MAX_SEEDS = 1_000_000


def parse_seeds(text: str) -> list[int]:
    """'0-3,10' -> [0, 1, 2, 3, 10], as the authors' --seeds (numbers in ASCII digits, see lego_model.parsing).

    Refused: seeds outside [0, 2^32) (the per-seed generators' range: larger
    seeds would alias smaller ones), a seed given twice (it would be one image
    under two counts), and more than :data:`MAX_SEEDS` seeds (counted before
    any list is built).
    """
    spans: list[tuple[int, int]] = []  # inclusive (low, high) per part
    for part in text.split(","):
        ends = part.split("-")
        if len(ends) > 2 or not all(is_whole_number(end) for end in ends):
            raise LegoError(f"cannot parse seeds {quoted(text)}; write a list like 0-63,100 (ASCII digits)")
        lo, hi = (parse_int(end, "seed", 0, SEED_RANGE - 1) for end in (ends[0], ends[-1]))
        if hi < lo:
            raise LegoError(f"seed range {quoted(part.strip(' '))} runs backwards; write LOW-HIGH")
        spans.append((lo, hi))
    count = sum(hi - lo + 1 for lo, hi in spans)
    if count > MAX_SEEDS:
        raise LegoError(
            f"{count} seeds is more than the limit of {MAX_SEEDS}; split the run into several --seeds ranges"
        )
    if not spans:
        raise LegoError("no seeds given")
    seeds = [s for lo, hi in spans for s in range(lo, hi + 1)]
    if len(set(seeds)) != count:
        seen: set[int] = set()
        dup = next(s for s in seeds if s in seen or seen.add(s))
        raise LegoError(f"seed {dup} is given more than once in {quoted(text)}; list each seed once")
    return seeds


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, rounded as the authors' generate.py does."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def as_output(images: torch.Tensor, output: str) -> torch.Tensor | np.ndarray | list[Any]:
    """[-1, 1] NCHW images as a request's ``output``: the tensor itself ("tensor", "latents"), uint8 NHWC numpy
    ("uint8"), or a list of PIL images ("pil")."""
    if output in ("tensor", "latents"):
        return images
    arr = to_uint8_nhwc(images)
    if output == "uint8":
        return arr
    from PIL import Image

    return [Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a) for a in arr]


def save_image(image: np.ndarray, path: str | Path) -> None:
    """Write one uint8 HWC image (1 or 3 channels) as PNG."""
    from PIL import Image

    arr = image[:, :, 0] if image.shape[2] == 1 else image
    Image.fromarray(arr).save(path)


# grid.png is for a person to look at: each picture at least this many pixels a side (nearest-neighbour upscale,
# so no pixel is invented); the per-seed PNGs stay at the model's size.
GRID_MIN_TILE = 64


def make_grid(images: np.ndarray, rows: int | None = None, pad: int = 2, min_tile: int = GRID_MIN_TILE) -> np.ndarray:
    """Tile N uint8 HWC images into one picture, ``rows`` rows (default: as square as possible).

    Small images (the shipped model's 16x16 digits) are enlarged by a whole
    factor, nearest neighbour, until each is at least ``min_tile`` pixels a side.
    """
    n, h, w, c = images.shape
    rows = rows or max(1, int(math.sqrt(n)))
    cols = math.ceil(n / rows)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[i]
    scale = max(1, math.ceil(min_tile / min(h, w)))
    return grid.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else grid


def class_row_seeds(seeds: list[int], label_dim: int, class_idx: int | None = None) -> list[tuple[int, list[int]]]:
    """Deal the seeds into one row per class: [(class, seeds of that row), ...] in class order."""
    refuse_unconditional("this model", label_dim, "--class-rows")
    if class_idx is not None:
        raise LegoError("--class-rows gives every class its own row: leave out --class")
    if len(seeds) % label_dim:
        raise LegoError(f"--class-rows needs a multiple of {label_dim} seeds (one row per class), got {len(seeds)}")
    per_row = len(seeds) // label_dim
    return [(c, seeds[c * per_row : (c + 1) * per_row]) for c in range(label_dim)]
