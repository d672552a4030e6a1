"""The reference model: configs, variable resolution, tiles, the brick-level API."""

from __future__ import annotations

import pytest
import torch

from lego_model import LEGO_CONFIGS, ConfigError, LegoConfig, LegoModel, ShapeError, get_config
from lego_model.model import sincos_pos_table
from lego_model.precond import canvas_coords, denoise_with_bricks, edm_scalings, model_input

AUTHORS = [name for name in LEGO_CONFIGS if name.startswith("lego_")]


@pytest.fixture(scope="module")
def pg():
    return LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()


def test_registry_holds_every_authors_architecture():
    expected = {
        "lego_S_PG_64", "lego_S_PR_64", "lego_S_U_32", "lego_S_U_64", "lego_L_PG_32", "lego_L_PR_32",
        "lego_L_PG_64", "lego_L_PR_64", "lego_L_U_32", "lego_L_U_64", "lego_L_PG_64_old", "lego_L_PR_64_old",
        "lego_XL_PG_32", "lego_XL_PR_32", "lego_XL_PG_64", "lego_XL_PR_64", "lego_XL_U_32", "lego_XL_U_64",
    }  # fmt: skip
    assert set(AUTHORS) == expected


def test_unknown_config_lists_valid_names():
    with pytest.raises(ConfigError, match="valid names: .*lego_S_PG_64"):
        get_config("lego_S_PG_65")


def test_inconsistent_config_is_refused():
    with pytest.raises(ConfigError, match="multiple of the patch"):
        LegoConfig("bad", (4, 6), (2, 4), (1, 1), 64, 4)
    with pytest.raises(ConfigError, match="divisible by num_heads"):
        LegoConfig("bad", (4,), (2,), (1,), 66, 4)
    with pytest.raises(ConfigError, match="unknown config fields"):
        LegoConfig.from_dict({**get_config("tiny_PG_16").to_dict(), "colour": 1})
    # Checked before anything allocates: a hidden size of 2**20 would be ~1e13 parameters.
    with pytest.raises(ConfigError, match="parameters"):
        LegoConfig("huge", (4,), (2,), (1,), 2**20, 4)
    with pytest.raises(ConfigError, match="depths must be a list of integers"):
        LegoConfig.from_dict({**get_config("tiny_PG_16").to_dict(), "depths": [1, 2.0, 2]})
    assert LegoConfig.from_dict({**get_config("tiny_PG_16").to_dict(), "mlp_ratio": 4}) == get_config("tiny_PG_16")


@pytest.mark.parametrize("name", AUTHORS)
def test_authors_architectures_build_at_full_size(name):
    cfg = get_config(name)
    with torch.device("meta"):  # full size without allocating the weights
        model = LegoModel(cfg)
    n = sum(t.numel() for t in model.state_dict().values())  # parameters + the fixed position tables
    assert [b.pos_embed.shape[1] for b in model.bricks] == [
        (r // p) ** 2 for r, p in zip(cfg.brick_sizes, cfg.patch_sizes)
    ]
    assert len(model.bricks) == cfg.num_bricks
    assert cfg.parameter_count() == n  # the size bound of LegoConfig counts without building
    # Counted on the authors' implementation (label_dim 1000; their pos_embed is a frozen Parameter).
    authors_counts = {"lego_L_PG_64": 501_627_096, "lego_XL_U_32": 1_261_977_392, "lego_S_U_64": 62_008_740}
    if name in authors_counts:
        assert n == authors_counts[name]


def test_config_round_trip():
    cfg = get_config("tiny_U_16")
    assert LegoConfig.from_dict(cfg.to_dict()) == cfg


def test_state_dict_uses_authors_keys(pg):
    keys = set(pg.state_dict())
    for key in [
        "model.model.0.blocks.0.attn.qkv.weight",
        "model.model.2.final_layer.linear.bias",
        "model.model.1.x_embedder.proj.weight",
        "model.model.0.pos_embed",
        "model.t_embedder.mlp.0.weight",
        "model.y_embedder.embedding_table.weight",
    ]:
        assert key in keys


def test_position_table_layout():
    table = sincos_pos_table(8, 3)[0]  # (9, 8): token t = row * 3 + col
    # First half encodes the column, second half the row; each half is [sin, cos] over 2 frequencies.
    assert torch.allclose(table[1, 0], torch.tensor(1.0).sin())  # column 1
    assert torch.allclose(table[3, 4], torch.tensor(1.0).sin())  # row 1
    assert torch.allclose(table[3, 0], torch.tensor(0.0))  # column 0


@pytest.mark.parametrize("hw", [(16, 16), (16, 48), (64, 32)])
def test_non_square_shapes(pg, hw):
    h, w = hw
    x = torch.randn(2, 3, h, w)
    labels = torch.eye(10)[[1, 7]]
    with torch.no_grad():
        out = pg(x, torch.tensor([0.5, 3.0]), labels)
    assert out.shape == (2, 3, h, w) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_size_that_is_not_a_multiple_names_the_multiple(pg):
    with pytest.raises(ShapeError, match="multiples of 16"):
        pg(torch.randn(1, 3, 16, 20), torch.tensor([1.0]))


def test_coords_row_first_over_whole_canvas():
    c = canvas_coords(4, 6)
    assert c.shape == (1, 2, 4, 6)
    torch.testing.assert_close(c[0, 0, :, 0], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))  # rows vary down
    assert torch.equal(c[0, 1, 0, [0, -1]], torch.tensor([-1.0, 1.0]))  # columns vary across


@pytest.mark.parametrize("k", [0, 1, 2])
def test_tiles_are_processed_independently(pg, k):
    """Brick k's output on a tile depends only on that tile of its inputs (coordinates included)."""
    brick, r = pg.bricks[k], pg.config.brick_sizes[k]
    x_in = torch.randn(1, 5, 32, 48)
    f_prev = torch.randn(1, 3, 32, 48) if k else None
    cond = torch.randn(1, 64)
    with torch.no_grad():
        full = brick(x_in, f_prev, cond)
        for top in range(0, 32, r):
            for left in range(0, 48, r):
                window = (..., slice(top, top + r), slice(left, left + r))
                alone = brick(x_in[window], None if f_prev is None else f_prev[window], cond)
                # One tile alone vs all tiles in one batch: the same math, GEMMs blocked differently (outputs
                # ~1, K <= 4 * hidden = 256 terms per dot product: ~sqrt(K) * 2^-24 ~ 1e-6 per layer, a few layers).
                torch.testing.assert_close(full[window], alone, atol=1e-5, rtol=0)


def test_brick_api_chain_equals_forward(pg):
    """Calling embed and bricks one by one (as the runtimes do) equals the model's forward."""
    x, sigma, labels = torch.randn(2, 3, 32, 16), torch.tensor([0.1, 20.0]), torch.eye(10)[[0, 9]]
    with torch.no_grad():
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma)
        x_in = model_input(x, c_in, canvas_coords(32, 16))
        cond = pg.embed(c_noise, labels)
        f = pg.bricks[0](x_in, None, cond)
        f = pg.bricks[2](x_in, f, cond)  # brick 1 skipped: f passes through
        manual = c_skip * x + c_out * f
        # The same ops in the same order (the forward is this chain): only the EDM scaling's fp32/fp64 casts differ.
        torch.testing.assert_close(pg(x, sigma, labels, active=(0, 2)), manual, atol=1e-6, rtol=0)
        first_skipped = denoise_with_bricks(
            pg.embed, list(pg.bricks), x, sigma, config=pg.config, class_labels=labels, active=(1,)
        )
        f1 = pg.bricks[1](x_in, torch.zeros_like(x), cond)  # a skipped brick 0 leaves f = 0
        torch.testing.assert_close(first_skipped, c_skip * x + c_out * f1, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_edm_scalings_are_the_authors_expressions_to_the_bit(dtype):
    """edm_scalings shares s^2 + sd^2 and its root among the four scalings; the bits must stay those of the
    authors' expressions, written out here as they write them, over noise levels from 1e-4 to 1e4."""
    gen = torch.Generator().manual_seed(0)
    sigma = torch.cat([torch.logspace(-4, 4, 20001, dtype=dtype), torch.rand(20000, generator=gen, dtype=dtype) * 80])
    sd = 0.5
    s = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    authors = (
        sd**2 / (s**2 + sd**2),
        s * sd / (s**2 + sd**2).sqrt(),
        1 / (sd**2 + s**2).sqrt(),
        s.log().flatten() / 4,
    )
    for name, got, want in zip(("c_skip", "c_out", "c_in", "c_noise"), edm_scalings(sigma, sd), authors):
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        assert torch.equal(got, want), f"{name}: {int((got != want).sum())} values differ"


def test_guidance_is_on_f_with_zero_null_label(pg):
    x, sigma, labels = torch.randn(1, 3, 16, 16), torch.tensor([2.0]), torch.eye(10)[[3]]
    with torch.no_grad():
        c_skip, c_out, _, _ = edm_scalings(sigma)
        f_cond = (pg(x, sigma, labels) - c_skip * x) / c_out
        f_null = (pg(x, sigma, torch.zeros_like(labels)) - c_skip * x) / c_out
        expected = c_skip * x + c_out * (f_null + 3.0 * (f_cond - f_null))
        torch.testing.assert_close(pg(x, sigma, labels, cfg_scale=3.0), expected, atol=1e-4, rtol=1e-4)


def test_unconditional_model_refuses_labels_and_guidance():
    model = LegoModel(get_config("tiny_PR_16")).eval()
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([1.0])
    with pytest.raises(ShapeError, match="unconditional"):
        model(x, sigma, torch.eye(10)[[0]])
    with pytest.raises(ShapeError, match="unconditional"):
        model(x, sigma, cfg_scale=2.0)


def test_empty_or_out_of_range_active_set(pg):
    x, sigma = torch.randn(1, 3, 16, 16), torch.tensor([1.0])
    with pytest.raises(ShapeError, match="at least one brick"):
        pg(x, sigma, active=())
    with pytest.raises(ShapeError, match="bricks 0..2"):
        pg(x, sigma, active=(3,))
