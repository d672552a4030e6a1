"""Parity with the authors' own implementation (../shared/fixtures/official_tiny.*)."""

from __future__ import annotations

import pytest
import torch

from lego_model import SkipPlan, draw_latents, edm_sample
from tests.conftest import official_model

MODELS = ["tiny_PG_16", "tiny_PR_16", "tiny_U_16"]
FORWARD_ATOL = 1e-4
SAMPLER_ATOL = 1e-3


def _cases(official, name):
    meta, _ = official
    return meta["models"][name]["cases"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("case", [0, 1], ids=["train_size", "larger_canvas"])
def test_forward_and_early_exits(official, name, case):
    _, t = official
    model = official_model(official, name)
    key = _cases(official, name)[case]["key"] + "/"
    x, sigma, labels = t[key + "x"], t[key + "sigma"], t.get(key + "class_labels")
    n = model.config.num_bricks
    with torch.no_grad():
        torch.testing.assert_close(model(x, sigma, labels), t[key + "D"], atol=FORWARD_ATOL, rtol=0)
        for k in range(n):
            # The authors' early exit after brick k is the plan that skips bricks k+1.. on every step.
            trailing = ",".join(str(j) for j in range(k + 1, n))
            plan = SkipPlan.parse([f"{trailing}@0:1"] if trailing else [], model.config)
            (active,) = plan.steps(1)
            assert active == tuple(range(k + 1))
            torch.testing.assert_close(
                model(x, sigma, labels, active), t[key + f"D_stage{k}"], atol=FORWARD_ATOL, rtol=0
            )


@pytest.mark.parametrize("name", ["tiny_PG_16", "tiny_U_16"])
@pytest.mark.parametrize("case", [0, 1], ids=["train_size", "larger_canvas"])
def test_guidance(official, name, case):
    _, t = official
    model = official_model(official, name)
    key = _cases(official, name)[case]["key"] + "/"
    with torch.no_grad():
        out = model(t[key + "x"], t[key + "sigma"], t[key + "class_labels"], cfg_scale=2.5)
    torch.testing.assert_close(out, t[key + "D_cfg2.5"], atol=FORWARD_ATOL, rtol=0)


@pytest.mark.parametrize("name,index", [(m, i) for m in MODELS for i in range(3) if not (m == "tiny_PR_16" and i == 2)])
def test_sampler_runs(official, name, index):
    meta, t = official
    spec = meta["models"][name]["samples"][index]
    model = official_model(official, name)
    cfg = model.config
    _, _, h, w = t[spec["key"] + "/latents"].shape
    latents, labels, rnd = draw_latents(spec["seeds"], cfg.img_channels, h, w, cfg.label_dim)
    torch.testing.assert_close(latents, t[spec["key"] + "/latents"], atol=0, rtol=0)
    if cfg.label_dim:
        torch.testing.assert_close(labels, t[spec["key"] + "/class_labels"], atol=0, rtol=0)
    churn = {k: spec[k] for k in ("S_churn", "S_min", "S_max", "S_noise") if k in spec}

    def denoise(x, sigma, active):
        return model(x, sigma, labels, active, spec["cfg_scale"])

    with torch.no_grad():
        images = edm_sample(
            denoise,
            latents,
            num_steps=spec["num_steps"],
            sigma_min=spec["sigma_min"],
            sigma_max=spec["sigma_max"],
            rho=spec["rho"],
            randn_like=rnd.randn_like,
            all_bricks=tuple(range(cfg.num_bricks)),
            **churn,
        )
    assert images.dtype == torch.float64
    torch.testing.assert_close(images, t[spec["key"] + "/images"], atol=SAMPLER_ATOL, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_position_tables_equal_fixture(official, name):
    from lego_model import LegoModel, get_config

    _, t = official
    fresh = LegoModel(get_config(name))
    for k, brick in enumerate(fresh.bricks):
        torch.testing.assert_close(brick.pos_embed, t[f"{name}/state/model.model.{k}.pos_embed"], atol=1e-6, rtol=0)
