"""int8 engine directories at run time: which precision each backend runs, refusals, parity with eager fp32."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from export.records import CheckpointRecord
from runtimes.backends import open_backend
from runtimes.backends.openvino import openvino_available
from runtimes.backends.precision import files_precision, resolve_precision
from runtimes.backends.torch_backend import TorchBackend
from runtimes.errors import BackendError
from runtimes.sample import main
from tests.runtimes.conftest import SEED, tiny_model
from tests.runtimes.test_openvino import all_patterns, chain_outputs, inputs, rel_l2

CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed (the cpu extra)")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LEGO_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def engines_int8(tmp_path_factory):
    """lego-export's int8 directory of tiny_PG_16 (random init SEED), calibrated on a 6-step schedule."""
    pytest.importorskip("nncf", reason="the int8 extra (nncf) is not installed")
    from export.calibration import CalibrationSettings
    from export.pipeline import ExportOptions, export_engine_dir

    options = ExportOptions(precision="int8", exporter="torchscript", calibration=CalibrationSettings(num_steps=6))
    out = tmp_path_factory.mktemp("int8") / "engines"
    export_engine_dir(tiny_model("tiny_PG_16"), out, CheckpointRecord.random_init(SEED), options)
    return out


def test_an_int8_export_is_int8_and_int8_needs_int8_files(engines_int8, engines_pg):
    from export.manifest import load_manifest

    assert files_precision(load_manifest(engines_int8).engines_for("onnx")) == "int8"  # int8 bricks, fp32 embedder
    assert files_precision(load_manifest(engines_pg).engines_for("onnx")) == "fp32"
    for requested in ("auto", "int8"):
        precision, why = resolve_precision(requested, CPU, files="int8")
        assert precision == "int8" and "int8 files, their float ops in" in why
    for requested in ("fp32", "bf16"):
        with pytest.raises(BackendError, match=rf"--precision {requested} asked, but these engines are int8 files"):
            resolve_precision(requested, CPU, files="int8")
    with pytest.raises(BackendError, match=r"--precision int8 needs int8 engine files, these are fp32: re-export"):
        resolve_precision("int8", CPU, files="fp32")
    with pytest.raises(BackendError, match="the torch backend runs the reference model in fp32 or bf16"):
        TorchBackend(tiny_model("tiny_PG_16"), device=CPU, precision="int8")


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", pytest.param("openvino", marks=needs_openvino)])
def test_int8_chain_is_within_the_int8_bound_of_eager_fp32(engines_int8, backend):
    """Every skip pattern, with and without guidance, through the int8 files.

    Each brick is within TOLERANCES["int8"] of its output range (verified at
    export); D mixes f linearly with fp32 EDM scalings, so D's relative error
    stays under that bound too.  Not bit-equal: int8 is a real approximation.
    """
    from export.verify import TOLERANCES

    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(2, 16, 32, 10)
    for cfg_scale in (None, 1.5):
        be, _ = open_backend(backend, engine_dir=engines_int8, precision="auto", threads=1)
        assert be.precision == "int8"
        runs = chain_outputs(be, labels, x, sigma, 16, 32, cfg_scale, all_patterns(3))
        for act, got in runs.items():
            err = rel_l2(got, model(x, sigma, labels, act, cfg_scale))
            assert 1e-5 < err <= TOLERANCES["int8"], f"{backend} {act} guidance {cfg_scale}: rel L2 {err:.2e}"


@needs_openvino
def test_openvino_refuses_a_precision_the_files_cannot_run(engines_int8, engines_pg, tmp_path):
    with pytest.raises(BackendError, match="these engines are int8 files"):
        open_backend("openvino", engine_dir=engines_int8, precision="bf16")
    with pytest.raises(BackendError, match="--precision int8 needs int8 engine files"):
        open_backend("openvino", engine_dir=engines_pg, precision="int8")
    args = ["--quiet", "--threads", "1", "--engine-dir", str(engines_int8), "--seeds", "0-1", "--steps", "3"]
    result = CliRunner().invoke(main, [*args, "--backend", "openvino", "--out", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert "precision int8 (auto: int8 files, their float ops in" in result.output
    result = CliRunner().invoke(main, [*args, "--backend", "openvino", "--precision", "fp32", "--out", str(tmp_path)])
    assert result.exit_code != 0 and result.output.strip().startswith("error: --precision fp32 asked, but")
    assert len(result.output.strip().splitlines()) == 1


def test_file_precision_backends_take_int8_for_int8_files_only(engines_int8, engines_pg):
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_int8, precision="int8")
    assert backend.precision == "int8"
    # the fix offered is one that works: no other backend runs int8 files in float or fp32 files in int8
    with pytest.raises(BackendError, match=r"these engines are int8 files.*pass --precision int8") as info:
        open_backend("onnxruntime-cpu", engine_dir=engines_int8, precision="fp32")
    assert "--backend" not in str(info.value)
    with pytest.raises(BackendError, match=r"--precision int8 needs int8 engine files, these are fp32") as info:
        open_backend("onnxruntime-cpu", engine_dir=engines_pg, precision="int8")
    assert "--backend" not in str(info.value)
