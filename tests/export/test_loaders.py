"""export.loaders: ONNX Runtime sessions from files and settings, TensorRT plans checked and given contexts.

ONNX Runtime runs for real (the cpu extra); TensorRT is a stand-in module with
the TensorRT 10 tensor API's names, enough to drive every branch of the
loaders on a machine without a GPU (the ``trt`` tests run the real one).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from export import loaders
from export.errors import BackendError, ManifestError
from export.identity import engine_identity, entry_identity, plan_name
from export.loaders import (
    SessionSettings,
    context_from_engine,
    engine_from_entry,
    engine_from_plan,
    execution_providers,
    session_from_onnx,
    session_options,
    shared_scratch,
)
from export.records import BuiltWith, CheckpointRecord, EngineEntry, Manifest, Profile, Verification, contract_io
from lego_model.configs import get_config

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the cpu extra)")


def _add_model(path: Path) -> bytes:
    """A two-input ONNX graph, out = a + b over float32 [N]: small enough to build here, real enough to run."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N"])

    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["out"])], "add", [value("a"), value("b")],
                              [value("out")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.18
    onnx.save(model, str(path))
    return path.read_bytes()


def test_session_from_a_path_and_from_bytes(tmp_path: Path) -> None:
    path = tmp_path / "add.onnx"
    content = _add_model(path)
    a, b = np.arange(4, dtype=np.float32), np.full(4, 0.5, dtype=np.float32)
    for source, name in ((path, None), (str(path), None), (content, "add.onnx")):
        session = session_from_onnx(source, SessionSettings(threads=1), name=name)
        (out,) = session.run(["out"], {"a": a, "b": b})
        np.testing.assert_array_equal(out, a + b)  # one float32 addition per element: exact
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_fusions_load_a_brick_as_lego_export_writes_it(tmp_path: Path) -> None:
    # The dynamo exporter writes the blocks' affine-free LayerNorms as LayerNormalization with a scale and no bias,
    # which onnxruntime 1.32's SkipLayerNorm fusion indexed past (IndexError, so --ort-optimization fusions refused
    # every file lego-export wrote); the fusions run on the file and leave its outputs as they were.
    from export.onnx_export import onnx_from_spec
    from export.specs import engine_specs
    from lego_model.model import LegoModel

    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    spec = engine_specs(model.config)[2]  # brick1: x_in, f_prev, cond
    path = tmp_path / "brick1.onnx"
    assert onnx_from_spec(spec, model, path, exporter="dynamo") == "dynamo"
    feed = {k: v.numpy() for k, v in spec.sample_inputs(model, 2, 16, 16, seed=0).items()}
    plain = session_from_onnx(path, SessionSettings(threads=1)).run(None, feed)[0]
    fused = session_from_onnx(path, SessionSettings(threads=1, optimization="fusions"), config=model.config)
    # The fused LayerNorm/Gelu kernels compute the same fp32 function with sums in another order: errors of a few
    # fp32 ulps on outputs of order 1 (measured 0 on lego_S_PG_64's bricks), far inside 1e-5.
    np.testing.assert_allclose(fused.run(None, feed)[0], plain, rtol=1e-5, atol=1e-6)


def test_session_options_follow_the_settings() -> None:
    opts = session_options(ort, SessionSettings(threads=3, optimization="basic", arena=False, spin=True))
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert not opts.enable_cpu_mem_arena and opts.log_severity_level == 3
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    default = session_options(ort, SessionSettings())
    assert default.intra_op_num_threads == 0  # ONNX Runtime's own choice
    assert default.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert default.enable_cpu_mem_arena and default.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    fusions = session_options(ort, SessionSettings(optimization="fusions"))
    assert fusions.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with pytest.raises(BackendError, match=r"unknown ONNX Runtime optimization 'most'; choose one of \['disable'"):
        session_options(ort, SessionSettings(optimization="most"))


def test_a_file_onnxruntime_cannot_load_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "brick0.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(BackendError, match=r"^onnxruntime cannot load .*brick0\.onnx \(.*\); re-export") as info:
        session_from_onnx(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BackendError, match=r"^onnxruntime cannot load engine brick0 \("):
        session_from_onnx(b"not an onnx file", name="engine brick0")


def test_execution_providers() -> None:
    assert execution_providers(ort, SessionSettings()) == ["CPUExecutionProvider"]
    cuda = torch.device("cuda", 1)
    without = types.SimpleNamespace(get_available_providers=lambda: ["CPUExecutionProvider"])
    with pytest.raises(BackendError, match="no CUDAExecutionProvider: pip install onnxruntime-gpu"):
        execution_providers(without, SessionSettings(device=cuda))
    gpu = types.SimpleNamespace(get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert execution_providers(gpu, SessionSettings(device=cuda)) == [("CUDAExecutionProvider", {"device_id": 1})]
    (provider,) = execution_providers(gpu, SessionSettings(device=cuda, stream=1234))
    assert provider == ("CUDAExecutionProvider", {"device_id": 1, "user_compute_stream": "1234"})


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(BackendError, match=r"onnxruntime is not installed: pip install 'lego-deploy\[cpu\]'"):
        session_from_onnx(b"", name="x")


# ------------------------------------------------------------------------------------ TensorRT, stood in


class _Mode:
    INPUT, OUTPUT = "INPUT", "OUTPUT"


class _DataType:
    def __init__(self, name: str) -> None:
        self.name = name


class _Context:
    def __init__(self, strategy: object = None) -> None:
        self.strategy = strategy
        self.memory: tuple[int, int] | None = None

    def set_device_memory(self, pointer: int, size: int) -> None:
        self.memory = (pointer, size)


class _Engine:
    """An ICudaEngine of the tensor API: name, I/O tensors, scratch size, contexts (TensorRT 10 signature)."""

    def __init__(self, name: str, inputs, outputs, scratch: int = 1024, make=_Context) -> None:
        self.name = name
        self.tensors = [(t, _Mode.INPUT) for t in inputs] + [(t, _Mode.OUTPUT) for t in outputs]
        self.num_io_tensors = len(self.tensors)
        self.device_memory_size_v2 = scratch
        self.make = make

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i][0].name

    def _tensor(self, name: str):
        return next((t, mode) for t, mode in self.tensors if t.name == name)

    def get_tensor_mode(self, name: str) -> str:
        return self._tensor(name)[1]

    def get_tensor_dtype(self, name: str) -> _DataType:
        return _DataType({"float32": "FLOAT", "float16": "HALF"}[self._tensor(name)[0].dtype])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self._tensor(name)[0].shape)

    def create_execution_context(self, *args: object) -> _Context | None:
        return self.make(*args)


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    """A ``tensorrt`` module whose Runtime deserializes ``plans`` (bytes -> engine; unknown bytes: None)."""
    plans: dict[bytes, _Engine] = {}

    class Runtime:
        def __init__(self, logger: object) -> None:
            self.logger = logger

        def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
            return plans.get(bytes(plan))

    trt = types.SimpleNamespace(
        Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=Runtime,
        TensorIOMode=_Mode,
        ExecutionContextAllocationStrategy=types.SimpleNamespace(USER_MANAGED="USER_MANAGED"),
        plans=plans,
    )
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


CONFIG = get_config("tiny_PG_16")
BUILT = BuiltWith(torch="2.13.0", onnx="1.19.0", onnxruntime=None, python="3.11", exporter="dynamo", opset=18,
                  tensorrt="10.9.0", gpu="GPU", compute_capability="9.0", onnx_sha256="ab" * 32,
                  engine_cache_key="cd" * 32)  # fmt: skip


def _plan_entry(engine_dir: Path, brick: int, plan: bytes) -> tuple[EngineEntry, Manifest]:
    inputs, outputs = contract_io(CONFIG, "brick", brick)
    (engine_dir / f"brick{brick}.plan").write_bytes(plan)
    entry = EngineEntry(
        name=f"brick{brick}", kind="brick", brick=brick, file=f"brick{brick}.plan", format="tensorrt",
        precision="fp16", inputs=inputs, outputs=outputs, profile=Profile((1, 1, 8), (16, 16, 64), (16, 16, 64)),
        sha256="ef" * 32, bytes=len(plan), built_with=BUILT, verification=Verification.of({}, 1e-2, "tensorrt"),
    )  # fmt: skip
    return entry, Manifest(config=CONFIG, checkpoint=CheckpointRecord.random_init(0), engines=[entry])


def test_engine_from_entry_checks_identity_and_io(fake_trt, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    entry, manifest = _plan_entry(tmp_path, 1, b"plan of brick1")
    runtime = loaders.plan_runtime()
    identity = entry_identity(entry, manifest)
    fake_trt.plans[b"plan of brick1"] = engine = _Engine(plan_name(identity), entry.inputs, entry.outputs)
    assert engine_from_entry(runtime, entry, manifest, tmp_path) is engine

    other = engine_identity("brick2", "brick", 2, "fp16", CONFIG, manifest.checkpoint)
    fake_trt.plans[b"plan of brick1"] = _Engine(plan_name(other), entry.inputs, entry.outputs)
    with pytest.raises(ManifestError, match=r"brick1\.plan \(engine brick1\): the file says engine 'brick2'"):
        engine_from_entry(runtime, entry, manifest, tmp_path)

    f16 = [dataclasses.replace(t, dtype="float16") if t.name == "cond" else t for t in entry.inputs]
    fake_trt.plans[b"plan of brick1"] = _Engine(plan_name(identity), f16, entry.outputs)
    with pytest.raises(ManifestError, match="input 'cond' is float16 in the file, float32 in the manifest"):
        engine_from_entry(runtime, entry, manifest, tmp_path)

    fake_trt.plans[b"plan of brick1"] = _Engine("", entry.inputs, entry.outputs)  # an older lego-export's plan
    with caplog.at_level(logging.WARNING, logger="export.loaders"):
        engine_from_entry(runtime, entry, manifest, tmp_path)
    assert "carries no identity" in caplog.text

    del fake_trt.plans[b"plan of brick1"]
    with pytest.raises(BackendError, match=r"TensorRT cannot deserialize .*brick1\.plan; rebuild with lego-export"):
        engine_from_entry(runtime, entry, manifest, tmp_path)
    with pytest.raises(BackendError, match=r"^TensorRT cannot deserialize x\.plan; rebuild"):
        engine_from_plan(runtime, b"junk", "x.plan")


def test_contexts_on_shared_or_own_scratch(fake_trt) -> None:
    engines = [_Engine("a", [], [], scratch=4096), _Engine("b", [], [], scratch=1 << 20)]
    scratch = shared_scratch(engines, torch.device("cpu"))
    assert scratch.dtype == torch.uint8 and scratch.numel() == 1 << 20  # the largest engine's
    assert shared_scratch([], torch.device("cpu")).numel() == 1  # never a zero-byte allocation

    ctx = context_from_engine(engines[0], "a", scratch)
    assert ctx.strategy == "USER_MANAGED" and ctx.memory == (scratch.data_ptr(), scratch.numel())
    assert context_from_engine(engines[0], "a").strategy is None  # without scratch: TensorRT allocates it

    class RuntimeConfigContext(_Context):
        """Versions whose create_execution_context takes an IRuntimeConfig, not the strategy."""

        def __init__(self, config: object = None) -> None:
            if isinstance(config, str):
                raise TypeError("incompatible function arguments")
            super().__init__(None if config is None else config.strategy)

    class RuntimeConfig:
        strategy = None

        def set_execution_context_allocation_strategy(self, strategy: object) -> None:
            self.strategy = strategy

    legacy = _Engine("c", [], [], make=RuntimeConfigContext)
    legacy.create_runtime_config = RuntimeConfig
    assert context_from_engine(legacy, "c", scratch).strategy == "USER_MANAGED"

    failing = _Engine("d", [], [], make=lambda *args: None)
    for memory in (scratch, None):
        with pytest.raises(BackendError, match=r"could not create an execution context for brick3 \(out of GPU memory"):
            context_from_engine(failing, "brick3", memory)


def test_attach_scratch_before_set_device_memory() -> None:
    """TensorRT 10.0 sets the pointer alone (``device_memory``); 10.1 and later take pointer and size."""

    class OldContext:
        device_memory = None

    scratch = torch.empty(64, dtype=torch.uint8)
    old = OldContext()
    loaders.attach_scratch(old, scratch)
    assert old.device_memory == scratch.data_ptr()
