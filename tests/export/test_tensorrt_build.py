"""TensorRT: the pure parts (cache keys, engine cache, missing-dependency message) here; builds under `trt`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from export import tensorrt_build
from export.errors import MissingDependencyError
from export.manifest import Profile, load_manifest
from export.pipeline import ExportOptions, export_engine_dir
from export.tensorrt_build import (
    EngineCache,
    engine_cache_key,
    engine_cache_parts,
    missing_tensorrt_message,
    require_tensorrt,
    timing_cache_name,
)

from .conftest import RANDOM_INIT

SHA = "ab" * 32
PROFILE = Profile(batch=(1, 1, 8), height=(16, 16, 64), width=(16, 16, 64))
BASE = (SHA, "fp16", PROFILE, "10.9.0", "9.0")


def test_cache_key_is_a_deterministic_hash() -> None:
    key = engine_cache_key(*BASE)
    assert key == engine_cache_key(SHA, "fp16", Profile((1, 1, 8), (16, 16, 64), (16, 16, 64)), "10.9.0", "9.0")
    assert len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize(
    "changed",
    [
        ("cd" * 32, "fp16", PROFILE, "10.9.0", "9.0"),
        (SHA, "fp32", PROFILE, "10.9.0", "9.0"),
        (SHA, "fp16", Profile((1, 2, 8), (16, 16, 64), (16, 16, 64)), "10.9.0", "9.0"),
        (SHA, "fp16", Profile((1, 1, 8), (16, 16, 64), (16, 32, 64)), "10.9.0", "9.0"),
        (SHA, "fp16", PROFILE, "10.9.1", "9.0"),
        (SHA, "fp16", PROFILE, "10.9.0", "8.9"),
    ],
)
def test_every_key_part_matters(changed: tuple) -> None:
    assert engine_cache_key(*changed) != engine_cache_key(*BASE)


def test_timing_cache_name() -> None:
    assert timing_cache_name("10.9.0", "9.0") == "timing-trt10.9.0-sm90.cache"
    assert timing_cache_name("10.9.0", "8.6") != timing_cache_name("10.9.0", "9.0")


def test_engine_cache_reuses_only_on_full_match(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache")
    plan = tmp_path / "brick0.plan"
    plan.write_bytes(b"serialized engine")
    key, parts = engine_cache_key(*BASE), engine_cache_parts(*BASE)
    assert cache.lookup(key, parts) is None  # empty cache
    cache.store(key, parts, plan)
    hit = cache.lookup(key, parts)
    assert hit is not None and hit.read_bytes() == b"serialized engine"
    other = engine_cache_parts(SHA, "fp16", PROFILE, "10.9.0", "8.9")
    assert cache.lookup(key, other) is None  # a record whose parts differ is not reused
    hit.write_bytes(b"serialized enginX")  # damaged plan: hash mismatch
    assert cache.lookup(key, parts) is None
    (tmp_path / "cache" / f"{key}.json").write_text("{not json")
    assert cache.lookup(key, parts) is None
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_missing_message_is_one_line_with_the_fix() -> None:
    message = missing_tensorrt_message(["the tensorrt package", "a CUDA GPU"], "all")
    assert "\n" not in message
    assert message.startswith(
        "--engines all needs TensorRT and a CUDA GPU; missing here: the tensorrt package; a CUDA GPU"
    )
    assert "pip install -e '.[gpu]'" in message


def test_require_tensorrt_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    assert "the tensorrt package" in tensorrt_build.missing_tensorrt_requirements()
    with pytest.raises(MissingDependencyError, match=r"missing here: the tensorrt package"):
        require_tensorrt("trt")


# ------------------------------------------------------------------------------------------ real builds


@pytest.fixture(scope="module")
def trt_env():
    missing = tensorrt_build.missing_tensorrt_requirements()
    if missing:
        pytest.skip(f"TensorRT builds need {'; '.join(missing)}")
    return require_tensorrt()


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_verify_and_cache(trt_env, tiny_model, tmp_path: Path, precision: str) -> None:
    options = ExportOptions(engines="all", precision=precision, cache_dir=tmp_path / "cache")
    first = export_engine_dir(tiny_model, tmp_path / "a", RANDOM_INIT, options)
    plans = load_manifest(tmp_path / "a").engines_for("tensorrt")
    assert list(plans) == ["embedder", "brick0", "brick1", "brick2"]
    assert plans["brick1"].built_with["compute_capability"] == trt_env.compute_capability
    assert plans["brick1"].verification["runtime"] == "tensorrt"
    assert all(r.note == "(built)" for r in first.reports if r.format == "tensorrt")
    assert (tmp_path / "cache" / timing_cache_name(trt_env.tensorrt_version, trt_env.compute_capability)).is_file()
    second = export_engine_dir(tiny_model, tmp_path / "b", RANDOM_INIT, options)
    assert all(r.note == "(engine cache hit)" for r in second.reports if r.format == "tensorrt")
