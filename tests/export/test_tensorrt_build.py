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
ENV = tensorrt_build.TrtEnvironment("10.9.0", "NVIDIA H100 80GB HBM3", "9.0")
BASE = (SHA, "fp16", PROFILE, ENV, None)


def test_cache_key_is_a_deterministic_hash() -> None:
    key = engine_cache_key(*BASE)
    same = tensorrt_build.TrtEnvironment("10.9.0", "NVIDIA H100 80GB HBM3", "9.0")
    assert key == engine_cache_key(SHA, "fp16", Profile((1, 1, 8), (16, 16, 64), (16, 16, 64)), same, None)
    assert len(key) == 64 and int(key, 16) >= 0


@pytest.mark.parametrize(
    "changed",
    [
        ("cd" * 32, "fp16", PROFILE, ENV, None),
        (SHA, "fp32", PROFILE, ENV, None),
        (SHA, "fp16", Profile((1, 2, 8), (16, 16, 64), (16, 16, 64)), ENV, None),
        (SHA, "fp16", Profile((1, 1, 8), (16, 16, 64), (16, 32, 64)), ENV, None),
        (SHA, "fp16", PROFILE, dataclasses.replace(ENV, tensorrt_version="10.9.1"), None),
        (SHA, "fp16", PROFILE, dataclasses.replace(ENV, compute_capability="8.9"), None),
        (SHA, "fp16", PROFILE, dataclasses.replace(ENV, gpu_name="NVIDIA H200"), None),  # also 9.0
        (SHA, "fp16", PROFILE, ENV, 1 << 30),  # a workspace limit changes the tactics TensorRT may take
    ],
)
def test_every_key_part_matters(changed: tuple) -> None:
    assert engine_cache_key(*changed) != engine_cache_key(*BASE)


def test_timing_cache_name() -> None:
    assert timing_cache_name(ENV) == "timing-trt10.9.0-sm90-nvidia-h100-80gb-hbm3.cache"
    assert timing_cache_name(dataclasses.replace(ENV, compute_capability="8.6")) != timing_cache_name(ENV)
    assert timing_cache_name(dataclasses.replace(ENV, gpu_name="NVIDIA H200")) != timing_cache_name(ENV)


def test_engine_cache_reuses_only_on_full_match_and_keeps_the_builder(tmp_path: Path) -> None:
    cache = EngineCache(tmp_path / "cache")
    plan = tmp_path / "brick0.plan"
    plan.write_bytes(b"serialized engine")
    key, parts = engine_cache_key(*BASE), engine_cache_parts(*BASE)
    assert cache.lookup(key, parts) is None  # empty cache
    cache.store(key, parts, plan, ENV)
    hit = cache.lookup(key, parts)
    assert hit is not None and hit.path.read_bytes() == b"serialized engine" and hit.builder == ENV
    other = engine_cache_parts(SHA, "fp16", PROFILE, dataclasses.replace(ENV, compute_capability="8.9"))
    assert cache.lookup(key, other) is None  # a record whose parts differ is not reused
    hit.path.write_bytes(b"serialized enginX")  # damaged plan: hash mismatch
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
H100 = tensorrt_build.TrtEnvironment("10.9.0", "NVIDIA H100 80GB HBM3", "9.0")
H200 = tensorrt_build.TrtEnvironment("10.9.0", "NVIDIA H200", "9.0")  # the same compute capability


class FakeBuilds(list):
    """Engines "built" (cache hits do not build), the timing cache each build was given, and the GPU "here"."""

    def __init__(self) -> None:
        super().__init__()
        self.timing_caches: list[Path] = []
        self.env = FAKE_ENV


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> FakeBuilds:
    """No TensorRT needed: a builder that writes a stand-in plan, and a runner that runs its ONNX file in ORT."""
    built = FakeBuilds()

    def build(spec, onnx_path, plan_path, profile, timing_cache, workspace_bytes=None, identity=None) -> None:
        assert identity is not None and identity["lego.engine"] == spec.name  # the plan is told what it is
        built.append(spec.name)
        built.timing_caches.append(Path(timing_cache))
        Path(plan_path).write_bytes(b"plan of " + Path(onnx_path).read_bytes())

    def runner(spec, plan_path):  # the plan computes what its ONNX file (beside it in the staging dir) does
        return dataclasses.replace(onnx_runner(spec, Path(plan_path).with_suffix(".onnx"), "fp32"), runtime="tensorrt")

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", lambda requested="trt": built.env)
    monkeypatch.setattr(tensorrt_build, "engine_from_onnx", build)
    monkeypatch.setattr(tensorrt_build, "plan_runner", runner)
    return built


def test_gpus_of_one_compute_capability_share_no_cached_plan_or_timing_cache(fake_tensorrt, tiny_model, tmp_path):
    """An H100 and an H200 are both 9.0: a plan (or timing cache) tuned on one must not be taken as the other's,
    and the manifest must name the GPU that built the plan."""
    options = ExportOptions(engines="all", exporter="torchscript", cache_dir=tmp_path / "cache")
    fake_tensorrt.env = H100
    export_engine_dir(tiny_model, tmp_path / "h100", RANDOM_INIT, options)
    fake_tensorrt.env = H200
    second = export_engine_dir(tiny_model, tmp_path / "h200", RANDOM_INIT, options)
    assert [r.note for r in second.reports if r.format == "tensorrt"] == ["(built)"] * 4
    h100_timing, h200_timing = fake_tensorrt.timing_caches[0], fake_tensorrt.timing_caches[-1]
    assert h100_timing != h200_timing
    assert load_manifest(tmp_path / "h200").engines_for("tensorrt")["brick0"].built_with.gpu == H200.gpu_name


def test_a_plan_that_fails_verification_is_not_cached(fake_tensorrt, tiny_model, tmp_path, monkeypatch):
    def off_by_a_percent(spec, plan_path):
        inner = onnx_runner(spec, Path(plan_path).with_suffix(".onnx"), "fp32")
        return dataclasses.replace(inner, runtime="tensorrt", run=lambda inputs: inner.run(inputs) * 1.01)

    options = ExportOptions(engines="all", exporter="torchscript", cache_dir=tmp_path / "cache")
    good = tensorrt_build.plan_runner
    monkeypatch.setattr(tensorrt_build, "plan_runner", off_by_a_percent)
    with pytest.raises(VerificationError):
        export_engine_dir(tiny_model, tmp_path / "a", RANDOM_INIT, options)
    monkeypatch.setattr(tensorrt_build, "plan_runner", good)  # e.g. a fixed TensorRT, or the cause found
    again = export_engine_dir(tiny_model, tmp_path / "b", RANDOM_INIT, options)
    assert next(r.note for r in again.reports if r.format == "tensorrt") == "(built)"  # not the refused plan


@pytest.fixture
def trt_builder(monkeypatch):
    """The fake tensorrt module of tests/fakes (its builder side) on a fake H200."""
    from tests.fakes.cuda import FakeCuda
    from tests.fakes.tensorrt import FakeTensorRT

    trt = FakeTensorRT(FakeCuda(name=H200.gpu_name), version=H200.tensorrt_version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module())
    return trt


def test_a_timing_cache_from_another_gpu_is_replaced_with_a_warning(trt_builder, fp32_export, tmp_path, caplog):
    """TensorRT refuses it (set_timing_cache returns False, get_timing_cache() is then None): the build must
    go on with a fresh cache, say so in one line, and leave a cache of this GPU."""
    import json

    from export.specs import engine_specs

    spec = next(s for s in engine_specs(fp32_export.manifest.config) if s.name == "brick1")
    onnx_path = fp32_export.out / "brick1.onnx"
    timing = tmp_path / "timing.cache"
    timing.write_bytes(json.dumps({"device": H100.gpu_name, "entries": 7}).encode())
    plan = tmp_path / "brick1.plan"
    with caplog.at_level("WARNING"):
        tensorrt_build.engine_from_onnx(spec, onnx_path, plan, PROFILE, timing)
    assert plan.read_bytes().startswith(b"FAKEPLAN")
    assert json.loads(timing.read_bytes())["device"] == H200.gpu_name
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "timing cache" in warnings[0] and "\n" not in warnings[0]


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
            engine_cache_key=engine_cache_key(onnx_entry.sha256, "fp32", plan.profile, FAKE_ENV),
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
    assert (tmp_path / "cache" / timing_cache_name(trt_env)).is_file()
    second = export_engine_dir(tiny_model, tmp_path / "b", RANDOM_INIT, options)
    assert all(r.note == "(engine cache hit)" for r in second.reports if r.format == "tensorrt")
