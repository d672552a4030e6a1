"""The digit classifier, the Fréchet distance and the per-plan quality table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lego_model import LegoConfig, LegoModel, get_config
from lego_model.digits.classifier import DigitClassifier, load_classifier, predict, save_classifier, train_classifier
from lego_model.digits.quality import (
    evaluate_plan,
    feature_stats,
    frechet_distance,
    markdown_table,
    sample_per_class,
    standard_plans,
)
from lego_model.errors import CheckpointError, LegoError
from lego_model.images import class_row_seeds, make_grid
from lego_model.skip import SkipPlan

TINY = LegoConfig("tiny_digits_16", (4, 8, 16), (2, 4, 2), (1, 1, 1), 32, 2, img_channels=1, label_dim=10)


def test_frechet_distance_closed_forms():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8, dtype=torch.float64)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    # b = 2a + 1: cov_b = 4 cov_a, so tr(S + 4S - 2 (4 S^2)^(1/2)) = tr(S).
    mu, cov = feature_stats(a)
    expected = float((mu + 1).square().sum() + cov.trace())
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, 2 * a + 1) == pytest.approx(frechet_distance(2 * a + 1, a), rel=1e-6)


def test_standard_plans_cover_exits_and_presets():
    cfg = get_config("digits_pg_16")
    plans = dict(standard_plans(cfg))
    assert list(plans)[:3] == ["full stack", "exit after brick 0", "exit after brick 1"]
    assert plans["exit after brick 0"].steps(4) == [(0,)] * 4
    assert plans["exit after brick 1"].steps(4) == [(0, 1)] * 4
    assert plans["global@0.6"].steps(5) == [(0, 1, 2)] * 3 + [(0, 1)] * 2  # PG: brick 2 is global
    assert plans["local@0.4"].steps(5) == [(1, 2)] * 2 + [(0, 1, 2)] * 3  # PG: brick 0 is local
    costs = {n: p.relative_cost(cfg, 18, "heun", 16, 16) for n, p in plans.items()}
    assert costs["full stack"] == pytest.approx(1.0)
    assert costs["exit after brick 0"] < costs["exit after brick 1"] < 1.0
    assert costs["global@0.4"] < costs["global@0.6"] < costs["global@0.8"] < 1.0


def test_classifier_save_load_and_predict(tmp_path):
    torch.manual_seed(0)
    model = DigitClassifier().eval()
    path = save_classifier(model, tmp_path / "c.safetensors", {"test_accuracy": "0.5"})
    loaded = load_classifier(path)
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    pred, feats = predict(loaded, x, batch_size=2)
    assert pred.shape == (5,) and feats.shape == (5, 64)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")


def test_classifier_learns_separable_classes():
    """Two classes that differ in which half is bright: a few epochs must separate them."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 1, 16, 16, generator=g) * 0.2 - 1
    y = torch.arange(64) % 2
    x[y == 0, :, :8] += 1.5
    x[y == 1, :, 8:] += 1.5
    model = train_classifier(x, y, epochs=5, batch_size=16, lr=5e-3)
    pred, _ = predict(model, x)
    assert (pred == y).float().mean() > 0.95


def test_sample_per_class_and_evaluate_plan():
    model = LegoModel(TINY).randomize_(0).eval()
    images, classes = sample_per_class(model, SkipPlan(3), 2, num_steps=2)
    assert images.shape == (20, 1, 16, 16) and images.abs().max() <= 1
    assert classes.tolist() == [c for c in range(10) for _ in range(2)]
    again, _ = sample_per_class(model, SkipPlan(3), 2, num_steps=2)
    torch.testing.assert_close(images, again, atol=0, rtol=0)  # seeded
    torch.manual_seed(0)
    classifier = DigitClassifier().eval()
    real = torch.randn(50, 64)
    plan = SkipPlan.parse(["2@0:1"], TINY)
    row = evaluate_plan(model, classifier, real, "exit after brick 1", plan, 2, num_steps=2)
    assert 0 <= row.accuracy <= 1 and row.frechet >= 0
    assert row.relative_cost == pytest.approx(plan.relative_cost(TINY, 2, "heun", 16, 16))
    assert "| exit after brick 1 | 2@0:1 |" in markdown_table([row])


def test_unconditional_model_is_refused():
    model = LegoModel(get_config("tiny_PR_16")).eval()
    with pytest.raises(LegoError, match="unconditional"):
        sample_per_class(model, SkipPlan(3), 2, num_steps=1)


def test_class_row_seeds():
    assert class_row_seeds(list(range(6)), 3) == [(0, [0, 1]), (1, [2, 3]), (2, [4, 5])]
    with pytest.raises(LegoError, match="multiple of 3"):
        class_row_seeds(list(range(4)), 3)
    with pytest.raises(LegoError, match="class-conditional"):
        class_row_seeds(list(range(4)), 0)


def test_make_grid_rows_and_upscale():
    images = np.arange(20 * 16 * 16, dtype=np.uint8).reshape(20, 16, 16, 1) % 251
    grid = make_grid(images, rows=10)  # 10 rows of 2 images of 16 px with 2 px padding, then 4x (tiles >= 64 px)
    assert grid.shape == (4 * (10 * 18 + 2), 4 * (2 * 18 + 2), 1)
    np.testing.assert_array_equal(grid[8 : 8 + 64 : 4, 8 : 8 + 64 : 4, 0], images[0, :, :, 0])  # nearest neighbour
    assert make_grid(np.zeros((4, 64, 64, 3), np.uint8)).shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # large: as is
