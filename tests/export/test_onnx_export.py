"""ONNX files of a tiny model: checker, the I/O contract, parity with eager at many shapes, half precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import onnx_export
from export.errors import VerificationError
from export.manifest import load_manifest
from export.onnx_export import check_onnx, onnx_from_spec, op_input_dtypes
from export.pipeline import ExportResult
from export.records import Verification
from export.specs import engine_specs
from export.verify import TOLERANCES, eager_output, onnx_runner, verify_engine, widen_bf16
from lego_model.model import LegoModel

from .conftest import onnx_file

ENGINES = ["embedder", "brick0", "brick1", "brick2"]


@pytest.mark.parametrize("name", ENGINES)
def test_checker_and_contract(fp32_export: ExportResult, name: str) -> None:
    path = onnx_file(fp32_export, name)
    onnx.checker.check_model(str(path), full_check=True)
    spec = {s.name: s for s in engine_specs(fp32_export.manifest.config)}[name]
    check_onnx(path, spec)  # names, dtypes, symbolic B/H/W of inputs and outputs
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input}
    if name == "embedder":
        assert dims == {"c_noise": ["B"], "class_labels": ["B", 10]}
    else:
        assert dims["x_in"] == ["B", 5, "H", "W"] and dims["cond"] == ["B", 64]
        assert ("f_prev" in dims) == (name != "brick0")
        # The patch embedding is a MatMul on patches (lego_model.forwards.PatchLinear), never a Conv.
        assert "Conv" not in {n.op_type for n in graph.node}


@pytest.mark.parametrize(
    "channels,patch,tile,shape",
    [(8, 8, 16, (2, 64, 32)), (5, 2, 4, (3, 8, 16)), (1, 4, 4, (1, 4, 12)), (5, 2, 64, (1, 64, 128))],
)
def test_patch_linear_computes_the_patch_embedding(
    channels: int, patch: int, tile: int, shape: tuple[int, int, int]
) -> None:
    from lego_model.forwards import PatchLinear
    from lego_model.model import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(channels, 24, patch)
    batch, h, w = shape
    x = torch.randn(batch, channels, h, w)
    with torch.no_grad():
        want, got = embed(x, tile), PatchLinear(embed)(x, tile)  # tokens (B, L, T, D) in the same tile order
    assert got.shape == want.shape == (batch, (h // tile) * (w // tile), (tile // patch) ** 2, 24)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # one fp32 sum over C*p*p terms, another order


def test_manifest_of_export(fp32_export: ExportResult) -> None:
    manifest = load_manifest(fp32_export.out)
    assert manifest == fp32_export.manifest
    entry = manifest.engines_for("onnx")["brick1"]
    assert entry.built_with.exporter == "dynamo" and entry.built_with.torch == torch.__version__
    assert entry.built_with.compute_capability is None and entry.built_with.tensorrt is None
    shapes = entry.verification.shapes
    assert len(shapes) >= 2 and "2x16x32" in shapes and "1x32x32" in shapes  # non-square, larger than training
    assert 0 < entry.verification.max_rel < TOLERANCES["fp32"]
    assert entry.verification.max_rel == max(e.max_rel for e in shapes.values())
    assert entry.verification.runtime == "onnxruntime-cpu"
    assert sorted(p.name for p in fp32_export.out.iterdir()) == sorted(
        [f"{n}.onnx" for n in ENGINES] + ["manifest.json"]
    )


def _run(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 16, 48), (2, 48, 32), (1, 80, 64)])
@pytest.mark.parametrize("name", ENGINES)
def test_ort_parity(fp32_export: ExportResult, tiny_model: LegoModel, name: str, shape: tuple[int, int, int]) -> None:
    spec = {s.name: s for s in engine_specs(tiny_model.config)}[name]
    inputs = spec.sample_inputs(tiny_model, *shape, seed=7)
    ref = eager_output(spec, tiny_model, inputs)
    out = _run(onnx_file(fp32_export, name), inputs)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_torchscript_fallback(tiny_model: LegoModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    spec = engine_specs(tiny_model.config)[2]  # brick1
    path = tmp_path / "brick1.onnx"
    assert onnx_from_spec(spec, tiny_model, path) == "torchscript"
    inputs = spec.sample_inputs(tiny_model, 2, 16, 40)
    np.testing.assert_allclose(_run(path, inputs), eager_output(spec, tiny_model, inputs), rtol=1e-4, atol=1e-5)


def test_verification_failure_names_brick_shape_and_error(fp32_export: ExportResult, tiny_model: LegoModel) -> None:
    other = LegoModel(tiny_model.config).randomize_(1).eval()  # the file no longer matches this model
    spec = engine_specs(tiny_model.config)[2]
    with pytest.raises(VerificationError) as info:
        verify_engine(spec, other, onnx_runner(spec, onnx_file(fp32_export, "brick1"), "fp32"), "fp32", [(2, 16, 32)])
    message = str(info.value)
    assert (
        "brick1 (fp32, onnxruntime-cpu) differs" in message
        and "batch 2, 16x32" in message
        and "tolerance 0.0001" in message
    )
    assert "\n" not in message


def test_fp16_structure(fp16_files: dict[str, tuple[Path, Verification]]) -> None:
    brick = op_input_dtypes(fp16_files["brick1"][0])
    assert brick["LayerNormalization"] == {"float32"}
    assert brick["Softmax"] == {"float32"}
    assert brick["MatMul"] == {"float16"} and brick["Conv"] == {"float16"} and brick["Gemm"] == {"float16"}
    embedder = op_input_dtypes(fp16_files["embedder"][0])
    assert embedder["Sin"] == {"float32"} and embedder["Cos"] == {"float32"}
    assert embedder["Gemm"] == {"float16"}
    for path, _ in fp16_files.values():
        graph = onnx.load(str(path)).graph
        f32 = onnx.TensorProto.FLOAT
        assert all(v.type.tensor_type.elem_type == f32 for v in [*graph.input, *graph.output])  # fp32 I/O
        elements: dict[int, int] = {}
        for t in graph.initializer:
            elements[t.data_type] = elements.get(t.data_type, 0) + int(np.prod(t.dims))
        # the weights are stored in half precision; the few fp32 values are LayerNorm's unit scales
        assert elements.get(onnx.TensorProto.FLOAT, 0) < 0.01 * elements[onnx.TensorProto.FLOAT16], path.name


def test_fp16_errors(fp16_files: dict[str, tuple[Path, Verification]]) -> None:
    for path, verification in fp16_files.values():
        # really computed in half precision (error well above fp32's) and still within tolerance
        assert 1e-5 < verification.max_rel < TOLERANCES["fp16"], path.name


def test_bf16_structure_and_emulated_verification(tiny_model: LegoModel, tmp_path: Path) -> None:
    spec = engine_specs(tiny_model.config)[2]
    path = tmp_path / "brick1.onnx"
    onnx_from_spec(spec, tiny_model, path, precision="bf16")
    ops = op_input_dtypes(path)
    assert ops["MatMul"] == {"bfloat16"} and ops["Gemm"] == {"bfloat16"}
    assert ops["LayerNormalization"] == {"float32"} and ops["Softmax"] == {"float32"}
    assert ops["Conv"] == {"float32"}  # ONNX Conv has no bf16 before opset 22
    widened = widen_bf16(onnx.load(str(path)))
    assert not any(t.data_type == onnx.TensorProto.BFLOAT16 for t in widened.graph.initializer)
    result = verify_engine(spec, tiny_model, onnx_runner(spec, path, "bf16"), "bf16", [(1, 16, 16), (2, 16, 32)])
    assert result.runtime == "onnxruntime-cpu-fp32-emulation"
    assert 1e-5 < result.max_rel < TOLERANCES["bf16"]


def test_export_is_deterministic(tiny_model: LegoModel, tmp_path: Path) -> None:
    """Same model, same bytes: the TensorRT engine cache is keyed by the ONNX sha256."""
    spec = engine_specs(tiny_model.config)[0]
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for path in paths:
        onnx_from_spec(spec, tiny_model, path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    # nor does the checkout's location leak in (the exporter's stack-trace annotations are dropped)
    assert str(Path(__file__).resolve().parents[2]).encode() not in paths[0].read_bytes()
    assert not any(node.metadata_props for node in onnx.load(str(paths[0])).graph.node)


def test_unloadable_file_is_a_verification_error(tiny_model: LegoModel, tmp_path: Path) -> None:
    path = tmp_path / "brick0.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(VerificationError, match=r"^onnxruntime cannot load brick0\.onnx \(") as info:
        onnx_runner(engine_specs(tiny_model.config)[1], path, "fp32")
    assert "\n" not in str(info.value)
