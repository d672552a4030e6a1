"""The files shipped in lego_model/assets: they load, sample deterministically and stay small."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from lego_model import get_config, load_checkpoint
from lego_model.digits.classifier import load_classifier, predict, shipped_classifier
from lego_model.eager import sample_images
from lego_model.shipped import ASSETS, DEFAULT_MODEL, shipped_checkpoint

MAX_ASSETS_BYTES = 10 * 2**20


@pytest.fixture(scope="module")
def shipped_model():
    return load_checkpoint(shipped_checkpoint())


def test_default_model_is_the_digits_pg_model(shipped_model):
    assert DEFAULT_MODEL == "digits_pg"
    assert shipped_model.config == get_config("digits_pg_16")
    with safe_open(str(shipped_checkpoint()), framework="pt") as f:
        meta = f.metadata()
    assert meta["weights"] == "ema" and int(meta["train_steps"]) > 0


def test_shipped_model_samples_deterministically(shipped_model):
    def run(seeds):
        return sample_images(shipped_model, seeds, size=16, steps=3, classes=3)

    a, b = run([0, 1]), run([0, 1])
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert a.shape == (2, 1, 16, 16) and torch.isfinite(a).all()
    assert not torch.equal(a[0], a[1])  # different seeds, different images
    # An image depends on its seed alone; another batch size only changes float32 summation order
    # (the difference stays far below one 8-bit grey level, 2/255).
    torch.testing.assert_close(run([1])[0], a[1], atol=1e-3, rtol=0)


def test_shipped_model_samples_non_square(shipped_model):
    x = sample_images(shipped_model, [0], size=(16, 64), steps=2, classes=0)
    assert x.shape == (1, 1, 16, 64) and torch.isfinite(x).all()


def test_shipped_classifier_loads():
    classifier = load_classifier(shipped_classifier())
    with safe_open(str(shipped_classifier()), framework="pt") as f:
        assert float(f.metadata()["test_accuracy"]) > 0.95
    pred, feats = predict(classifier, torch.zeros(2, 1, 16, 16))
    assert pred.shape == (2,) and feats.shape == (2, 64)


def test_assets_stay_small():
    total = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert total < MAX_ASSETS_BYTES, f"lego_model/assets holds {total / 2**20:.1f} MiB"
