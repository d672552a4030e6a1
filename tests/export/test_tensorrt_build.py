"""TensorRT: the pure parts (cache keys, engine cache, missing-dependency message) here; builds under `trt`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from export import tensorrt_build
from export.errors import MissingDependencyError, VerificationError
from export.manifest import load_manifest
from export.pipeline import ExportOptions, export_engine_dir
from export.records import Profile
from export.tensorrt_build import (
    EngineCache,
    engine_cache_key,
    engine_cache_parts,
    missing_tensorrt_message,
    require_tensorrt,
    timing_cache_name,
)
from export.verify import onnx_runner

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


# ------------------------------------------------------------- the TensorRT path of the pipeline, faked


FAKE_ENV = tensorrt_build.TrtEnvironment("10.9.0", "Fake GPU", "9.0")


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No TensorRT needed: a builder that writes a stand-in plan, and a runner that runs its ONNX file in ORT.

    Returns the list of engines "built" (cache hits do not build).
    """
    built: list[str] = []

    def build(spec, onnx_path, plan_path, profile, timing_cache, workspace_bytes=None, identity=None) -> None:
        assert identity is not None and identity["lego.engine"] == spec.name  # the plan is told what it is
        built.append(spec.name)
        Path(plan_path).write_bytes(b"plan of " + Path(onnx_path).read_bytes())

    def runner(spec, plan_path):  # the plan computes what its ONNX file (beside it in the staging dir) does
        return dataclasses.replace(onnx_runner(spec, Path(plan_path).with_suffix(".onnx"), "fp32"), runtime="tensorrt")

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda requested="trt": FAKE_ENV)
    monkeypatch.setattr(tensorrt_build, "engine_from_onnx", build)
    monkeypatch.setattr(tensorrt_build, "plan_runner", runner)
    return built


def test_tensorrt_records_and_engine_cache(fake_tensorrt: list[str], tiny_model, tmp_path: Path) -> None:
    options = ExportOptions(engines="all", exporter="torchscript", cache_dir=tmp_path / "cache")
    first = export_engine_dir(tiny_model, tmp_path / "a", RANDOM_INIT, options)
    manifest = load_manifest(tmp_path / "a")
    files, plans = manifest.engines_for("onnx"), manifest.engines_for("tensorrt")
    assert list(plans) == list(files) == ["embedder", "brick0", "brick1", "brick2"]
    assert fake_tensorrt == list(plans)
    for name, plan in plans.items():
        onnx_entry = files[name]
        assert plan.file == f"{name}.plan" and plan.profile == onnx_entry.profile
        assert plan.built_with == dataclasses.replace(
            onnx_entry.built_with,
            tensorrt="10.9.0",
            gpu="Fake GPU",
            compute_capability="9.0",
            onnx_sha256=onnx_entry.sha256,
            engine_cache_key=engine_cache_key(onnx_entry.sha256, "fp32", plan.profile, "10.9.0", "9.0"),
        )
        assert plan.verification.runtime == "tensorrt" and onnx_entry.verification.runtime == "onnxruntime-cpu"
        assert plan.verification.shapes.keys() == onnx_entry.verification.shapes.keys()
        assert plan.verification.max_rel == onnx_entry.verification.max_rel  # the same file ran, the same loop
    assert [r.note for r in first.reports if r.format == "tensorrt"] == ["(built)"] * 4
    second = export_engine_dir(tiny_model, tmp_path / "b", RANDOM_INIT, options)
    assert [r.note for r in second.reports if r.format == "tensorrt"] == ["(engine cache hit)"] * 4
    assert len(fake_tensorrt) == 4  # nothing rebuilt
    assert load_manifest(tmp_path / "b").engines_for("tensorrt")["brick1"].built_with == plans["brick1"].built_with


def test_tensorrt_plan_that_differs_is_refused(
    fake_tensorrt: list[str], tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def off_by_a_percent(spec, plan_path):
        inner = onnx_runner(spec, Path(plan_path).with_suffix(".onnx"), "fp32")
        return dataclasses.replace(inner, runtime="tensorrt", run=lambda inputs: inner.run(inputs) * 1.01)

    monkeypatch.setattr(tensorrt_build, "plan_runner", off_by_a_percent)
    out = tmp_path / "engines"
    options = ExportOptions(engines="all", exporter="torchscript", cache_dir=tmp_path / "cache")
    with pytest.raises(
        VerificationError, match=r"^embedder \(fp32, tensorrt\) differs from the eager model at batch 1"
    ):
        export_engine_dir(tiny_model, out, RANDOM_INIT, options)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".engines")]


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
    assert plans["brick1"].built_with.compute_capability == trt_env.compute_capability
    assert plans["brick1"].verification.runtime == "tensorrt"
    assert all(r.note == "(built)" for r in first.reports if r.format == "tensorrt")
    assert (tmp_path / "cache" / timing_cache_name(trt_env.tensorrt_version, trt_env.compute_capability)).is_file()
    second = export_engine_dir(tiny_model, tmp_path / "b", RANDOM_INIT, options)
    assert all(r.note == "(engine cache hit)" for r in second.reports if r.format == "tensorrt")
