"""The output side of a sampling run: per-seed PNGs, grid.png, the npz, and what ``--resume`` may reuse.

Every file is written under a temporary name and renamed into place, so that
a file that exists is always complete.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from lego_model.images import make_grid, save_image
from runtimes.errors import OutputError

GRID_MAX = 64  # images in grid.png


def check_writable(directory: Path) -> None:
    """Create ``directory`` and prove a file can be written there (OutputError otherwise)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {directory} ({err.strerror or err}); choose another --out/--npz") from None


def seed_png(out: Path, seed: int) -> Path:
    """The PNG of ``seed`` in the output directory ``out``."""
    return out / f"{seed:06d}.png"


def write_png(image: np.ndarray, path: Path) -> None:
    """Write via a temporary name and a rename, so that an existing PNG always is a complete image."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(image, tmp)
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    """uint8 HWC (grayscale files come back with one channel)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def pending(out: Path, seeds: list[int]) -> list[int]:
    """The seeds of ``seeds`` whose PNG is not yet in ``out`` (what ``--resume`` still samples)."""
    return [s for s in seeds if not seed_png(out, s).is_file()]


def assemble(out: Path, seeds: list[int], npz: Path | None) -> list[Path]:
    """grid.png of the first seeds and the npz of all seeds, read back from the per-seed PNGs."""
    written = []
    grid_imgs = np.stack([read_png(seed_png(out, s)) for s in seeds[:GRID_MAX]])
    tmp = out / ".grid.tmp.png"
    save_image(make_grid(grid_imgs), tmp)
    os.replace(tmp, out / "grid.png")
    written.append(out / "grid.png")
    if npz is not None:
        arr = np.stack([read_png(seed_png(out, s)) for s in seeds])  # (N, H, W, C) uint8
        tmp = npz.with_name(f".{npz.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr)
        os.replace(tmp, npz)
        written.append(npz)
    return written
