"""The benchmarks' per-engine timers and profilers (benchmarks/profiling.py), on a tiny model's ONNX files."""

from __future__ import annotations

import pytest

from benchmarks.profiling import call_feeds, engine_ms, profile_call
from export.manifest import load_manifest
from tests.runtimes.conftest import export_onnx_dir, tiny_model

RUNTIMES = ["onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = tiny_model("tiny_PG_16")
    engine_dir = export_onnx_dir(model, tmp_path_factory.mktemp("profiling"))
    return load_manifest(engine_dir), engine_dir, call_feeds(model, 2, 16, 16)


def _skip_without(runtime: str) -> None:
    pytest.importorskip("openvino" if runtime == "openvino" else "onnxruntime")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_engine_ms_times_every_engine_once_per_round(tiny, runtime):
    _skip_without(runtime)
    manifest, engine_dir, feeds = tiny
    times = engine_ms(manifest, engine_dir, runtime, feeds, rounds=(3, 3), budget_s=0.0)
    assert list(times) == list(feeds) == ["embedder", "brick0", "brick1", "brick2"]
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_profile_call_sums_node_times_by_type(tiny, runtime):
    _skip_without(runtime)
    manifest, engine_dir, feeds = tiny
    times = profile_call(manifest, engine_dir, runtime, feeds)
    assert times and all(ms >= 0 for ms in times.values())
    # Every brick's linears, whatever each runtime calls them after its fusions.
    assert any(kind in times for kind in ("MatMul", "FusedMatMul", "Gemm", "FullyConnected"))


def test_an_unknown_runtime_is_refused(tiny):
    manifest, engine_dir, feeds = tiny
    with pytest.raises(ValueError, match="no profiler for runtime 'tensorrt'"):
        engine_ms(manifest, engine_dir, "tensorrt", feeds, rounds=(1, 1), budget_s=0.0)
