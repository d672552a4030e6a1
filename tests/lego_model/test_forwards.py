"""The exported forms of lego_model.forwards: the same numbers as the eager model, in the layouts runtimes run well."""

from __future__ import annotations

import pytest
import torch

from lego_model import LegoConfig, LegoModel, get_config
from lego_model.forwards import ATTENTION_BLOCK_TOKENS, Fp32SoftmaxAttention, attention_group, engine_forward
from lego_model.model import Attention

# Attention of one 16-token block against 4-token tiles: the logits are the same dot products over d = 16-64
# terms, the softmax sums gain exact zeros.  Only the products' blocking may reorder an fp32 sum: a few
# eps = 1.2e-7 relative per dot product, well under 1e-5 of outputs of order 1.
GROUPED_FP32 = 1e-5


@pytest.mark.parametrize(
    "name,groups",
    [
        ("digits_pg_16", [4, 1, 1]),  # the shipped model: 4-, 16-, 64-token tiles
        ("digits_pr_16", [1, 1, 4]),
        ("lego_S_PG_64", [4, 4, 1]),  # 4-, 4-, 1024-token tiles
        ("tiny_latent_PG_8", [4, 4, 1]),
    ],
)
def test_attention_group_reaches_the_block_size_where_every_canvas_allows(name: str, groups: list[int]) -> None:
    cfg = get_config(name)
    assert [attention_group(cfg, k) for k in range(cfg.num_bricks)] == groups
    for k, group in enumerate(groups):
        assert cfg.tile_tokens(k) * group <= max(ATTENTION_BLOCK_TOKENS, cfg.tile_tokens(k))
        # Every canvas (sides multiples of size_multiple) has a multiple of `group` tiles of brick k.
        assert ((cfg.size_multiple // cfg.brick_sizes[k]) ** 2) % group == 0


def test_attention_group_is_one_where_a_canvas_may_hold_too_few_tiles() -> None:
    # The largest brick has 4-token tiles and a minimal canvas holds one of them: no grouping there.
    cfg = LegoConfig("small_tiles", (4, 8), (2, 4), (1, 1), 64, 4, label_dim=10)
    assert [cfg.tile_tokens(k) for k in range(2)] == [4, 4]
    assert [attention_group(cfg, k) for k in range(2)] == [4, 1]  # an 8x8 canvas: 4 tiles of brick 0, 1 of brick 1


@pytest.mark.parametrize("tile_tokens,group,heads", [(4, 4, 4), (4, 2, 2), (1, 16, 4), (16, 1, 4)])
def test_grouped_attention_is_the_per_tile_attention(tile_tokens: int, group: int, heads: int) -> None:
    torch.manual_seed(0)
    attn = Attention(64, heads, tile_tokens).eval()
    grouped = Fp32SoftmaxAttention(attn, group)
    tiles = 3 * group * 2  # rows x tiles: blocks of `group` consecutive tiles, some of them across rows
    x = 3 * torch.randn(3, tiles // 3 * tile_tokens, 64)  # large logits: a leak across tiles would show
    with torch.no_grad():
        want, got = attn(x), grouped(x)
    torch.testing.assert_close(got, want, rtol=GROUPED_FP32, atol=GROUPED_FP32)
    if group > 1:  # the mask matters: without it the blocks would attend across tiles
        grouped.mask.zero_()
        with torch.no_grad():
            assert (grouped(x) - want).abs().max() > 100 * GROUPED_FP32


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_exported_bricks_group_their_small_tiles(precision: str) -> None:
    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    for k in range(model.config.num_bricks):
        forward = engine_forward(model, "brick", k, precision)
        groups = {m.group for m in forward.modules() if isinstance(m, Fp32SoftmaxAttention)}
        assert groups == {attention_group(model.config, k)}
