"""A small digit classifier, the judge of the shipped models' samples: ``python -m lego_model.digits.classifier``.

Two conv layers and two linears on 16x16 grey digits in [-1, 1].  Its
64-dimensional penultimate activations are the feature space of the Fréchet
distance in :mod:`lego_model.digits.quality` (the role Inception-v3 plays for FID on
natural images).  Trained on 80 % of scikit-learn's digits; the held-out 20 %
accuracy is stored in the file's metadata.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lego_model.checkpoints import read_safetensors, write_safetensors
from lego_model.cli import OneLineCommand, one_line_errors
from lego_model.errors import CheckpointError
from lego_model.files import CheckedPath
from lego_model.parsing import BoundedInt, parse_int
from lego_model.sampler import TORCH_SEED_MAX

log = logging.getLogger(__name__)

CLASSIFIER_FORMAT = "lego-digit-classifier/1"
MAX_EPOCHS = 10_000  # an epoch is ~1,400 digits; the shipped classifier trains 30
FEATURE_DIM = 64
MAX_CLASSES, MAX_RESOLUTION = 1000, 256  # of a classifier file: 10 classes at 16x16 are the digits' own


class DigitClassifier(nn.Module):
    """conv-pool-conv-pool-linear-linear; ``features`` is the 64-d layer before the logits."""

    def __init__(self, num_classes: int = 10, resolution: int = 16) -> None:
        super().__init__()
        self.resolution = resolution
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (resolution // 4) ** 2, FEATURE_DIM)
        self.fc2 = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x: (B, 1, R, R) in [-1, 1] -> (B, 64)."""
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, R/2, R/2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (B, 64, R/4, R/4)
        return F.relu(self.fc1(h.flatten(1)))  # (B, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))  # (B, num_classes) logits


def _shift(images: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Random translation by up to ``max_shift`` pixels (background -1 fills in), so the judge is not brittle."""
    B, _, H, W = images.shape
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)  # (B, 1, H+2s, W+2s)
    dy = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (B,), generator=generator)
    return torch.stack([pad[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def train_classifier(
    images: Tensor, targets: Tensor, *, epochs: int = 30, batch_size: int = 64, lr: float = 2e-3, seed: int = 0
) -> DigitClassifier:
    """Train on images (N, 1, R, R) in [-1, 1] with integer targets (N,); deterministic for a seed."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitClassifier(resolution=images.shape[-1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * ((len(images) + batch_size - 1) // batch_size)
    )
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(model(_shift(images[idx], gen)), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def predict(model: DigitClassifier, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(predicted classes (N,), features (N, 64)) for images (N, 1, R, R) in [-1, 1]."""
    preds, feats = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start : start + batch_size].float())
        feats.append(f)
        preds.append(model.fc2(f).argmax(dim=1))
    return torch.cat(preds), torch.cat(feats)


def save_classifier(model: DigitClassifier, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors with the architecture in the metadata; written atomically."""
    path = Path(path)
    meta = {
        "format": CLASSIFIER_FORMAT,
        "num_classes": str(model.fc2.out_features),
        "resolution": str(model.resolution),
        **(metadata or {}),
    }
    return write_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}, path, meta)


def load_classifier(path: str | Path) -> DigitClassifier:
    """Load a classifier written by :func:`save_classifier`, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"classifier {path} does not exist; train one with python -m lego_model.digits.classifier"
        )
    meta, state = read_safetensors(path)
    if meta.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(f"{path} is not a digit classifier written by lego_model.digits.classifier")
    # Read as the file's text: a resolution of 8192 would ask for a 68 GB first layer before any check.
    num_classes = parse_int(meta.get("num_classes"), f"{path}: num_classes", 1, MAX_CLASSES)
    resolution = parse_int(meta.get("resolution"), f"{path}: resolution", 4, MAX_RESOLUTION)
    model = DigitClassifier(num_classes, resolution)
    model.load_state_dict(state, strict=True)
    return model.eval()


def shipped_classifier() -> Path:
    """Path of the classifier shipped beside the digits models."""
    from lego_model.shipped import ASSETS

    return ASSETS / "digits_classifier.safetensors"


@click.command(cls=OneLineCommand)
@click.option("--out", type=CheckedPath(dir_okay=False), default=None, help="[default: the shipped classifier's path]")
@click.option("--epochs", type=BoundedInt(1, MAX_EPOCHS), default=30, show_default=True)
@click.option("--seed", type=BoundedInt(0, TORCH_SEED_MAX), default=0, show_default=True)
def main(out, epochs, seed):
    """Train the digit classifier on 80 % of the digits and report its held-out accuracy."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        from lego_model.digits.data import load_digits_dataset, train_test_split

        images, onehot = load_digits_dataset()
        targets = onehot.argmax(dim=1)
        train_idx, test_idx = train_test_split(len(images), seed=0)
        model = train_classifier(images[train_idx], targets[train_idx], epochs=epochs, seed=seed)
        pred, _ = predict(model, images[test_idx])
        acc = float((pred == targets[test_idx]).float().mean())
        meta = {
            "test_accuracy": f"{acc:.4f}",
            "train_info": json.dumps({"epochs": epochs, "seed": seed, "split": "80/20 seed 0"}),
        }
        path = save_classifier(model, out or shipped_classifier(), meta)
        click.echo(f"held-out accuracy {acc:.2%} on {len(test_idx)} digits; wrote {path}")


if __name__ == "__main__":
    main()
