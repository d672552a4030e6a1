"""Pure functions of the export specs: ranges, default profiles, profile shapes, the engine I/O contract."""

from __future__ import annotations

import pytest

from export.errors import ProfileError
from export.records import Profile
from export.specs import check_profile, default_profile, engine_specs, parse_range, profile_shapes
from export.verify import verification_shapes
from lego_model.configs import get_config


@pytest.mark.parametrize(("text", "expected"), [("1:2:8", (1, 2, 8)), ("4", (4, 4, 4)), (" 16:32:64 ", (16, 32, 64))])
def test_parse_range(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_range(text) == expected


@pytest.mark.parametrize("text", ["1:8", "a:b:c", "8:1:1", "0:1:2", "1:2:3:4", "-1:1:1", ""])
def test_parse_range_refuses(text: str) -> None:
    with pytest.raises(ProfileError, match="--batch"):
        parse_range(text, "--batch")


@pytest.mark.parametrize(
    ("name", "side"),
    [("lego_S_PG_64", (64, 64, 256)), ("lego_S_U_32", (32, 32, 128)), ("tiny_PG_16", (16, 16, 64))],
)
def test_default_profile(name: str, side: tuple[int, int, int]) -> None:
    profile = default_profile(get_config(name))
    assert profile == Profile(batch=(1, 1, 8), height=side, width=side)
    check_profile(profile, get_config(name))


def test_check_profile_refuses_illegal_sides() -> None:
    profile = Profile(batch=(1, 1, 8), height=(16, 16, 64), width=(16, 24, 64))
    with pytest.raises(ProfileError, match=r"width range 16:24:64 has sides \[24\] .* multiples of 16"):
        check_profile(profile, get_config("tiny_PG_16"))


def test_engine_specs_follow_the_contract() -> None:
    specs = {s.name: s for s in engine_specs(get_config("tiny_PG_16"))}
    assert list(specs) == ["embedder", "brick0", "brick1", "brick2"]
    assert [(t.name, t.shape) for t in specs["embedder"].inputs] == [("c_noise", ["B"]), ("class_labels", ["B", 10])]
    assert [(t.name, t.shape) for t in specs["embedder"].outputs] == [("cond", ["B", 64])]
    assert [(t.name, t.shape) for t in specs["brick0"].inputs] == [("x_in", ["B", 5, "H", "W"]), ("cond", ["B", 64])]
    assert [t.name for t in specs["brick2"].inputs] == ["x_in", "f_prev", "cond"]
    assert specs["brick2"].inputs[1].shape == ["B", 3, "H", "W"]
    assert [(t.name, t.shape) for t in specs["brick1"].outputs] == [("f", ["B", 3, "H", "W"])]
    assert all(t.dtype == "float32" for s in specs.values() for t in [*s.inputs, *s.outputs])
    assert [s.tile for s in specs.values()] == [1, 4, 8, 16]
    unconditional = engine_specs(get_config("tiny_PR_16"))[0]
    assert [t.name for t in unconditional.inputs] == ["c_noise"]


def test_profile_shapes() -> None:
    spec = engine_specs(get_config("tiny_PG_16"))[2]  # brick1
    profile = Profile(batch=(1, 2, 8), height=(16, 32, 64), width=(16, 48, 128))
    shapes = profile_shapes(spec, profile)
    assert shapes["x_in"] == ((1, 5, 16, 16), (2, 5, 32, 48), (8, 5, 64, 128))
    assert shapes["f_prev"] == ((1, 3, 16, 16), (2, 3, 32, 48), (8, 3, 64, 128))
    assert shapes["cond"] == ((1, 64), (2, 64), (8, 64))
    embedder = engine_specs(get_config("tiny_PG_16"))[0]
    assert profile_shapes(embedder, profile) == {
        "c_noise": ((1,), (2,), (8,)),
        "class_labels": ((1, 10), (2, 10), (8, 10)),
    }


def test_verification_shapes_cover_non_square_batch_and_large() -> None:
    cfg = get_config("lego_S_PG_64")
    assert verification_shapes(cfg, default_profile(cfg)) == [(1, 64, 64), (2, 64, 128), (1, 128, 128)]
    tiny = get_config("tiny_PG_16")
    shapes = verification_shapes(tiny, default_profile(tiny))
    assert any(h != w and b > 1 for b, h, w in shapes)
    assert any(h > tiny.resolution and w > tiny.resolution for _, h, w in shapes)


def test_verification_shapes_stay_inside_narrow_profiles() -> None:
    tiny = get_config("tiny_PG_16")
    single = Profile(batch=(1, 1, 1), height=(16, 16, 16), width=(16, 16, 16))
    assert verification_shapes(tiny, single) == [(1, 16, 16)]
    tall = Profile(batch=(2, 4, 4), height=(32, 32, 32), width=(16, 16, 48))
    shapes = verification_shapes(tiny, tall)
    assert shapes[0] == (4, 32, 16)
    for b, h, w in shapes:
        tall.check(b, h, w)
