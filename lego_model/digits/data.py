"""Training data that ships with a registry package: scikit-learn's handwritten digits.

1,797 grey 8x8 images of the digits 0-9 (UCI optdigits test set), pixel values
0..16.  We upscale them to 16x16 so that the three-brick PG model (tiles of 4,
8 and 16 pixels) has a local, a middle and a global brick, and scale to [-1, 1]
as EDM expects.  scikit-learn is the optional ``data`` extra; it is imported
only here, and only when the data are requested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lego_model.errors import LegoError

NUM_CLASSES = 10
RESOLUTION = 16


def load_digits_dataset(resolution: int = RESOLUTION) -> tuple[Tensor, Tensor]:
    """All digits as (images [N, 1, R, R] float32 in [-1, 1], one-hot labels [N, 10] float32)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise LegoError("the digits data need scikit-learn: pip install 'lego-deploy[data]'") from None
    digits = load_digits()
    images = torch.from_numpy(digits.images).to(torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    # Bilinear upscaling keeps the strokes smooth; nearest would teach the model 2x2 blocks.
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1) * 2 - 1  # (N, 1, R, R) in [-1, 1]
    labels = F.one_hot(torch.from_numpy(digits.target).long(), NUM_CLASSES).to(torch.float32)  # (N, 10)
    return images.contiguous(), labels


def train_test_split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A fixed random split of ``range(n)`` into (train indices, test indices)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:].sort().values, perm[:n_test].sort().values
