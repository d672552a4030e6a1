"""Session fixtures of the export tests: tiny models and their exported engine directories (built once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from export.onnx_export import onnx_from_spec
from export.pipeline import ExportOptions, ExportResult, export_engine_dir
from export.records import CheckpointRecord, TensorSpec, Verification
from export.specs import engine_specs
from export.verify import onnx_runner, verify_engine
from lego_model.configs import get_config
from lego_model.model import LegoModel

RANDOM_INIT = CheckpointRecord.random_init(0)


@pytest.fixture(scope="session")
def tiny_model() -> LegoModel:
    """tiny_PG_16 (class-conditional, bricks 4/8/16) with random weights everywhere."""
    return LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()


@pytest.fixture(scope="session")
def fp32_export(tiny_model: LegoModel, tmp_path_factory: pytest.TempPathFactory) -> ExportResult:
    out = tmp_path_factory.mktemp("fp32") / "engines"
    return export_engine_dir(tiny_model, out, RANDOM_INIT, ExportOptions(engines="onnx", precision="fp32"))


@pytest.fixture(scope="session")
def fp16_files(tiny_model: LegoModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Verification]]:
    """fp16 ONNX of the embedder and brick1 (enough for the structure tests): name -> (path, verification)."""
    out = tmp_path_factory.mktemp("fp16")
    specs = {s.name: s for s in engine_specs(tiny_model.config)}
    files = {}
    for name in ("embedder", "brick1"):
        path = out / f"{name}.onnx"
        onnx_from_spec(specs[name], tiny_model, path, precision="fp16")
        shapes = [(1, 1, 1), (2, 1, 1)] if name == "embedder" else [(1, 16, 16), (2, 16, 32)]
        runner = onnx_runner(specs[name], path, "fp16")
        files[name] = (path, verify_engine(specs[name], tiny_model, runner, "fp16", shapes))
    return files


def onnx_file(result: ExportResult, name: str) -> Path:
    return result.manifest.engines_for("onnx")[name].path(result.out)


def onnx_declaring(
    path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec], props: dict[str, str], producer: str = "test"
) -> bytes:
    """Write a small ONNX file that declares ``inputs``/``outputs`` and metadata ``props``; returns its bytes.

    Its graph (each output the Identity of the first input) is never run: it
    stands in for an engine file where only what load_manifest reads matters.
    """
    import onnx
    from onnx import TensorProto, helper

    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "bfloat16": TensorProto.BFLOAT16}

    def value(t: TensorSpec) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(t.name, elem.get(t.dtype, TensorProto.INT64), list(t.shape))

    nodes = [helper.make_node("Identity", [inputs[0].name], [t.name]) for t in outputs]
    graph = helper.make_graph(nodes, "stand_in", [value(t) for t in inputs], [value(t) for t in outputs])
    model = helper.make_model(graph, producer_name=producer)
    helper.set_model_props(model, props)
    content = model.SerializeToString()
    path.write_bytes(content)
    return content
