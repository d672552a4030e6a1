"""int8 engines: calibration along the model's own trajectories, NNCF's QDQ bricks, manifest, verification."""

from __future__ import annotations

import builtins
import math
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from export.calibration import CalibrationSettings, record_calibration
from export.errors import MissingDependencyError
from export.pipeline import ExportOptions, ExportResult, export_engine_dir
from export.quantize import activation_products, patch_products
from export.verify import TOLERANCES
from lego_model.sampler import edm_schedule
from tests.export.conftest import RANDOM_INIT, onnx_file

pytest.importorskip("nncf", reason="the int8 extra (nncf) is not installed")
pytest.importorskip("onnxruntime", reason="the cpu extra (onnxruntime) is not installed")

STEPS = 6  # a short schedule keeps the tests fast; it still spans sigma 80 .. 0.002
# TorchScript: a second per tiny engine, where the dynamo exporter takes several (both feed the same quantizer).
OPTIONS = ExportOptions(
    engines="onnx", precision="int8", exporter="torchscript", calibration=CalibrationSettings(num_steps=STEPS)
)


@pytest.fixture(scope="module")
def int8_dirs(tiny_model, tmp_path_factory) -> tuple[ExportResult, ExportResult]:
    """Two int8 exports of tiny_PG_16 into two directories (the second for the byte-identity test)."""
    return tuple(
        export_engine_dir(tiny_model, tmp_path_factory.mktemp(f"int8_{i}") / "engines", RANDOM_INIT, OPTIONS)
        for i in range(2)
    )


def test_calibration_records_every_noise_level_guided_and_unguided(tiny_model):
    settings = CalibrationSettings(images=2, num_steps=STEPS, seed=3)
    cal = record_calibration(tiny_model, settings)
    cfg = tiny_model.config
    levels = edm_schedule(STEPS).tolist()[:-1]  # the sigmas the steps start at (t_N = 0 is never evaluated)
    # One call per step and trajectory: the guided run, then the unguided one.
    assert cal.sigmas == pytest.approx(levels + levels)
    assert cal.rows == {"guided": 4, "unguided": 2}
    for k in range(cfg.num_bricks):
        feeds = cal.feeds[f"brick{k}"]
        assert len(feeds) == 2 * STEPS
        assert set(feeds[0]) == ({"x_in", "cond"} if k == 0 else {"x_in", "f_prev", "cond"})
        assert [f["x_in"].shape[0] for f in feeds] == [4] * STEPS + [2] * STEPS
        assert all(f["x_in"].dtype == np.float32 for f in feeds)
    cond = cal.feeds["brick0"][0]["cond"]
    # Guided rows are [cond; null]: the null half differs from the conditional half (another label embedding).
    assert not np.allclose(cond[:2], cond[2:])
    # Seeded: the same settings record the same tensors; another seed other ones.
    again = record_calibration(tiny_model, settings)
    assert all(np.array_equal(a["x_in"], b["x_in"]) for a, b in zip(cal.feeds["brick2"], again.feeds["brick2"]))
    other = record_calibration(tiny_model, CalibrationSettings(images=2, num_steps=STEPS, seed=4))
    assert not np.array_equal(cal.feeds["brick0"][0]["x_in"], other.feeds["brick0"][0]["x_in"])


def test_int8_export_quantizes_the_bricks_and_keeps_the_embedder_fp32(int8_dirs, tiny_model):
    result, _ = int8_dirs
    entries = result.manifest.engines_for("onnx")
    assert {name: e.precision for name, e in entries.items()} == {
        "embedder": "fp32",
        "brick0": "int8",
        "brick1": "int8",
        "brick2": "int8",
    }
    for name, entry in entries.items():
        model = onnx.load(str(onnx_file(result, name)))
        ops = {n.op_type for n in model.graph.node}
        props = {p.key: p.value for p in model.metadata_props}
        assert props["lego.precision"] == entry.precision
        if entry.precision == "int8":
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops
            quantized = {n.input[0] for n in model.graph.node if n.op_type in ("Gemm", "Conv")}
            dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
            assert "Conv" not in ops and not quantized & dequantized, f"{name}: adaLN Gemm must stay fp32"
            # Every linear reads int8; the attention products (q k^T and softmax(...) v of each block) and the
            # patch embedding stay float.
            products = set(activation_products(model))
            assert len(products) == 2 * tiny_model.config.depths[entry.brick], name
            patch = patch_products(model)
            assert len(patch) == 1 and patch[0] not in products, name
            for node in model.graph.node:
                if node.op_type == "MatMul":
                    floats = node.name in products or node.name in patch
                    assert (node.input[0] in dequantized) == (not floats), f"{name}: {node.name}"
        else:
            assert "QuantizeLinear" not in ops
    notes = {r.name: r.note for r in result.reports}
    depth = tiny_model.config.depths[0]
    # Per block: qkv, proj, fc1, fc2 in int8, the two attention products in float; the head's linear in int8;
    # the patch embedding in float.
    assert notes["brick0"].endswith(f"int8: {4 * depth + 1} MatMul; fp32: {depth + 1} Gemm, {2 * depth + 1} MatMul")


def test_int8_verification_reports_the_errors_against_fp32_under_the_int8_bound(int8_dirs):
    result, _ = int8_dirs
    for name, entry in result.manifest.engines_for("onnx").items():
        v = entry.verification
        assert v.runtime == "onnxruntime-cpu"
        assert v.tolerance == TOLERANCES[entry.precision]
        if entry.precision == "int8":
            # 8-bit activations: far from fp32 rounding (> 1e-3), inside the int8 bound.
            assert 1e-3 < v.max_rel <= TOLERANCES["int8"], name
            assert len(v.shapes) == 3 and all(math.isfinite(e.max_rel) for e in v.shapes.values())


def test_two_int8_exports_write_identical_files(int8_dirs):
    first, second = int8_dirs
    for name, entry in first.manifest.engines_for("onnx").items():
        assert onnx_file(first, name).read_bytes() == onnx_file(second, name).read_bytes(), name
        assert second.manifest.engines_for("onnx")[name].sha256 == entry.sha256


def test_int8_without_nncf_is_one_line_naming_the_extra(tiny_model, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_nncf(name, *args, **kwargs):
        if name == "nncf" or name.startswith("nncf."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nncf)
    with pytest.raises(MissingDependencyError, match=r"pip install -e '\.\[int8\]'"):
        export_engine_dir(tiny_model, tmp_path / "engines", RANDOM_INIT, OPTIONS)
    assert not (tmp_path / "engines").exists()  # refused before anything was written


def test_nncf_is_imported_without_telemetry(tmp_path):
    """NNCF would send usage telemetry and write a client id under $HOME; import_nncf declines both.

    In a fresh interpreter (under pytest NNCF stubs its telemetry by itself) with an empty home directory.
    """
    probe = (
        "import os; from export.quantize import import_nncf; import_nncf(); "
        "import nncf.telemetry.decorator as d; "
        "print(type(d.telemetry).__name__, 'NNCF_CI' in os.environ, 'CI' in os.environ)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "CI")}
    env["HOME"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["MagicMock", "False", "False"]  # NNCF's own stub; the environment restored
    assert list(tmp_path.iterdir()) == []  # no ~/intel/openvino_telemetry, no client id


def test_int8_bricks_run_in_onnxruntime_close_to_eager(int8_dirs, tiny_model):
    """One brick on a mid-schedule call: the int8 file against the eager fp32 brick, within the int8 bound."""
    from export.loaders import session_from_onnx

    result, _ = int8_dirs
    cal = record_calibration(tiny_model, CalibrationSettings(images=1, num_steps=STEPS, seed=7))
    feed = cal.feeds["brick2"][STEPS // 2]  # sigma ~ 1, where the brick's output carries D
    session = session_from_onnx(onnx_file(result, "brick2"))
    (out,) = session.run(None, feed)
    with torch.no_grad():
        ref = tiny_model.bricks[2](*(torch.from_numpy(feed[n]) for n in ("x_in", "f_prev", "cond"))).numpy()
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 1e-3 < err <= TOLERANCES["int8"]
