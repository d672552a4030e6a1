"""The benchmarks' backend helpers (benchmarks/backends.py)."""

from __future__ import annotations

from benchmarks.backends import open_engines
from benchmarks.conftest import BenchModel
from tests.runtimes.conftest import export_onnx_dir, tiny_model


def test_the_torch_backend_runs_the_benchmark_models_own_weights(tmp_path):
    """Not a second copy on the device: setting be.model before load() was overwritten by load()."""
    model = tiny_model("tiny_PG_16")
    engine_dir = export_onnx_dir(model, tmp_path / "engines")
    with open_engines(BenchModel("tiny", model, engine_dir), "torch") as backend:
        assert backend.model is model
