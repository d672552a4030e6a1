"""Skip plans: parsing, presets, costs and every error path."""

from __future__ import annotations

import pytest

from lego_model import SkipPlan, SkipPlanError, get_config
from lego_model.errors import LegoError
from lego_model.flops import brick_flops, denoiser_flops

PG, PR, U = get_config("lego_S_PG_64"), get_config("lego_S_PR_64"), get_config("lego_S_U_64")


def test_rule_covers_from_inclusive_to_exclusive():
    plan = SkipPlan.parse(["2@0.5:1"], PG)
    assert plan.steps(4) == [(0, 1, 2), (0, 1, 2), (0, 1), (0, 1)]


def test_top_and_lists_and_several_rules():
    plan = SkipPlan.parse(["top@0:0.25", "0, 1@0.75:1"], U)  # 5 bricks: top is brick 4
    steps = plan.steps(8)
    assert steps[0] == steps[1] == (0, 1, 2, 3)
    assert steps[2] == (0, 1, 2, 3, 4)
    assert steps[6] == steps[7] == (2, 3, 4)


def test_parse_takes_the_config_like_preset_and_of_accepts_plans_and_text():
    with pytest.raises(SkipPlanError, match="takes the model's LegoConfig"):
        SkipPlan.parse("2@0.6:1", 3)
    one = SkipPlan.parse("2@0.6:1", PG)  # one rule as a string, not its characters
    assert one.rules[0].bricks == (2,) and one == SkipPlan.parse(["2@0.6:1"], PG)
    assert SkipPlan.of(None, PG) == SkipPlan(3) == SkipPlan.of("full stack", PG) == SkipPlan.of(str(SkipPlan(3)), PG)
    assert SkipPlan.of(one, PG) is one
    assert SkipPlan.of("2@0.6:1", PG) == one
    both = SkipPlan.of(["global@0.5", "0@0:0.2"], PG)
    assert both == SkipPlan.preset("global@0.5", PG) + SkipPlan.parse("0@0:0.2", PG)
    with pytest.raises(SkipPlanError, match="is for 5 bricks"):
        SkipPlan.of(SkipPlan(5), PG)
    with pytest.raises(SkipPlanError, match="pass a SkipPlan"):
        SkipPlan.of([2], PG)


def test_presets_pick_global_and_local_bricks_by_tile_size():
    assert SkipPlan.preset("global", PG).rules[0].bricks == (2,)
    assert SkipPlan.preset("global", PR).rules[0].bricks == (0,)
    assert SkipPlan.preset("global", U).rules[0].bricks == (0, 4)
    assert SkipPlan.preset("local", U).rules[0].bricks == (2,)
    late = SkipPlan.preset("global@0.5", PG).steps(10)
    assert all(a == (0, 1, 2) for a in late[:5]) and all(a == (0, 1) for a in late[5:])
    early = SkipPlan.preset("local@0.3", PG).steps(10)
    assert all(a == (1, 2) for a in early[:3]) and all(a == (0, 1, 2) for a in early[3:])


@pytest.mark.parametrize("spec", ["global@1", "local@0", "global@1.0", "local @ 0"])
def test_a_preset_at_the_end_of_its_range_skips_nothing(spec):
    # F in [0, 1] is the documented range: its empty ends are the full stack, not a SkipRule error
    assert SkipPlan.preset(spec, PG).steps(10) == [(0, 1, 2)] * 10


@pytest.mark.parametrize(
    "rule,message",
    [
        ("3@0:1", "brick 3 does not exist; this model has bricks 0..2"),
        ("x@0:1", "not a brick index"),
        ("1@0.5:0.2", "FROM must be below TO"),
        ("1@0:1.5", "outside \\[0, 1\\]"),
        ("1@a:1", "cannot parse"),
        ("1", "cannot parse skip rule"),
    ],
)
def test_bad_rules(rule, message):
    with pytest.raises(SkipPlanError, match=message):
        SkipPlan.parse([rule], PG)


def test_a_step_with_no_brick_is_an_error():
    plan = SkipPlan.parse(["0,1@0.5:1", "2@0.5:1"], PG)
    assert plan.active(0, 2) == (0, 1, 2)
    with pytest.raises(SkipPlanError, match="leaves step 1 of 2 with no brick"):
        plan.steps(2)


def test_unknown_preset_and_bad_break_point():
    with pytest.raises(SkipPlanError, match="unknown skip preset"):
        SkipPlan.preset("middle", PG)
    with pytest.raises(SkipPlanError, match="outside"):
        SkipPlan.preset("global@2", PG)


def test_relative_cost_from_flops():
    full = SkipPlan(3)
    assert full.relative_cost(PG, 18, "heun", 64, 64) == pytest.approx(1.0)
    # Skip brick 2 on every step: cost = (embedder + bricks 0, 1) / (all).
    plan = SkipPlan.parse(["2@0:1"], PG)
    expected = denoiser_flops(PG, 64, 64, (0, 1)) / denoiser_flops(PG, 64, 64)
    assert plan.relative_cost(PG, 18, "euler", 64, 64) == pytest.approx(expected)
    # Heun weights steps by their denoiser calls: the last step has one call, the others two.
    last = SkipPlan.parse(["2@0.9:1"], PG)  # only step 9 of 10 skips brick 2
    saved = brick_flops(PG, 2, 64, 64) / (19 * denoiser_flops(PG, 64, 64))
    assert last.relative_cost(PG, 10, "heun", 64, 64) == pytest.approx(1 - saved)


def test_flop_count_of_a_brick_by_hand():
    # tiny_PG_16 brick 1 at 16x16: D=64, patch 4, 4 tokens/tile, 16 tokens, depth 2, mlp 256, C=3, Cin=8.
    cfg = get_config("tiny_PG_16")
    per_token = 2 * 8 * 16 * 64 + 2 * (2 * 64 * 192 + 4 * 4 * 64 + 2 * 64 * 64 + 4 * 64 * 256) + 2 * 64 * 16 * 3
    per_sample = 2 * 2 * 64 * 384 + 2 * 64 * 128
    assert brick_flops(cfg, 1, 16, 16) == 16 * per_token + per_sample


def test_describe_shows_steps_and_cost():
    text = SkipPlan.preset("global@0.5", PG).describe(PG, 10, "heun", 64, 64)
    assert "steps     0-4: bricks [0, 1, 2]" in text
    assert "steps     5-9: bricks [0, 1]" in text
    assert "relative cost: 0." in text


@pytest.mark.parametrize("num_steps", [0, -1, "3", 2.0, True, 1001])
def test_steps_refuses_what_is_not_a_step_count(num_steps):
    with pytest.raises(LegoError, match="sampling steps: use an int from 1 to 1000"):
        SkipPlan.preset("global@0.5", PG).steps(num_steps)
