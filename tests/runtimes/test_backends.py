"""Pure logic of the backends: auto choice, TensorRT compatibility, dtypes, graph keys, rank shares."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from export.manifest import load_manifest
from export.records import BuiltWith
from lego_model.checkpoints import save_checkpoint
from runtimes.backends import BACKENDS, REGISTRY, choose_backend, open_backend
from runtimes.backends.base import BackendOptions, buffer_dtypes
from runtimes.backends.trt import check_engine_compat
from runtimes.distributed import rank_info, shard
from runtimes.errors import BackendError
from runtimes.graphs import GraphKey
from tests.runtimes.conftest import tiny_model


def test_auto_walks_the_registry_in_order():
    usable = dict.fromkeys(["tensorrt", "onnxruntime-cuda", "openvino", "onnxruntime-cpu"])
    assert choose_backend("auto", usable)[0] == "tensorrt"
    name, why = choose_backend("auto", {**usable, "tensorrt": "built for 8.9"})
    assert name == "onnxruntime-cuda" and "tensorrt: built for 8.9" in why
    only_cpu = {"tensorrt": "no TensorRT engines", "onnxruntime-cuda": "no CUDA", "openvino": "not installed"}
    name, why = choose_backend("auto", {**only_cpu, "onnxruntime-cpu": None})
    assert name == "onnxruntime-cpu" and "no TensorRT engines" in why and "openvino: not installed" in why
    assert choose_backend("torch", {}) == ("torch", "requested")
    with pytest.raises(BackendError, match="no engines this machine can run"):
        choose_backend("auto", {**only_cpu, "onnxruntime-cpu": "no ONNX files"})
    with pytest.raises(BackendError, match="unknown backend 'trt'; choose one of auto, tensorrt"):
        choose_backend("trt", usable)


def test_the_registry_is_one_list_and_every_entry_says_what_it_runs():
    assert BACKENDS == ("auto", *(kind.name for kind in REGISTRY))
    assert [k.format for k in REGISTRY] == ["tensorrt", "onnx", "onnx", "onnx", None]
    for kind in REGISTRY:
        assert kind.uses <= {f.name for f in dataclasses.fields(BackendOptions)}, kind.name
        assert callable(kind.problem) and callable(kind.build) and kind.chosen


def test_an_option_the_backend_would_ignore_is_refused(engines_pg, tmp_path):
    pytest.importorskip("onnxruntime")
    ckpt = save_checkpoint(tiny_model("tiny_PG_16"), tmp_path / "other.safetensors")
    for options, flag in (
        (dict(checkpoint=ckpt), "--checkpoint"),
        (dict(config="tiny_PG_16"), "--config"),
        (dict(device="cpu"), "device="),
        (dict(random_init=True, config="tiny_PG_16"), "--random-init samples without engines"),
    ):
        with pytest.raises(BackendError, match=f"{flag}.*(onnxruntime-cpu|--engine-dir)"):
            open_backend("onnxruntime-cpu", engine_dir=engines_pg, **options)
    with pytest.raises(BackendError, match="--ort-optimization does not apply to the torch backend"):
        open_backend("torch", ort_optimization="disable")
    with pytest.raises(BackendError, match="--backend onnxruntime-cpu runs the engines of an engine directory"):
        open_backend("onnxruntime-cpu")
    backend, _ = open_backend("torch", engine_dir=engines_pg, checkpoint=ckpt)
    assert backend.weights.startswith("sha256:") and backend.manifest is not None  # the pixels' own weights


BUILT = BuiltWith(
    torch="2.13.0",
    onnx="1.19.0",
    onnxruntime="1.23.0",
    python="3.11.7",
    exporter="dynamo",
    opset=18,
    tensorrt="10.3.0",
    gpu="NVIDIA H100 80GB HBM3",
    compute_capability="9.0",
    onnx_sha256="ab" * 32,
    engine_cache_key="cd" * 32,
)


def test_tensorrt_engines_for_another_version_or_gpu_are_refused():
    assert check_engine_compat("brick0", BUILT, "10.3.0", "NVIDIA H100 80GB HBM3", "9.0") == []
    with pytest.raises(BackendError, match=r"built with TensorRT 10\.3\.0, this machine has TensorRT 10\.5\.0"):
        check_engine_compat("brick0", BUILT, "10.5.0", "NVIDIA H100 80GB HBM3", "9.0")
    with pytest.raises(BackendError, match=r"compute capability 9\.0 .* is 8\.9; rebuild"):
        check_engine_compat("brick1", BUILT, "10.3.0", "NVIDIA L4", "8.9")
    warnings = check_engine_compat("embedder", BUILT, "10.3.0", "NVIDIA H100 PCIe", "9.0")
    assert len(warnings) == 1 and "same architecture" in warnings[0]


def test_tensorrt_backend_refuses_cleanly_without_tensorrt(engines_pg):
    pytest.importorskip("onnxruntime")
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="cannot use --backend tensorrt"):
        open_backend("tensorrt", engine_dir=engines_pg)


def test_buffer_dtypes_read_from_specs_and_refuse_disagreement(engines_pg):
    entries = load_manifest(engines_pg).engines_for("onnx")
    assert buffer_dtypes(entries).f == torch.float32
    brick1 = entries["brick1"]
    half_in = [dataclasses.replace(s, dtype="float16") if s.name == "f_prev" else s for s in brick1.inputs]
    bad = {**entries, "brick1": dataclasses.replace(brick1, inputs=half_in)}
    with pytest.raises(BackendError, match="disagree on the dtype of 'f'"):
        buffer_dtypes(bad)


def test_graph_keys_separate_everything_a_capture_bakes_in():
    base = GraphKey.of(4, 64, 64, (0, 1, 2), False)
    assert GraphKey.of(4, 64, 64, [2, 1, 0, 0], False) == base  # same set, any order
    others = [
        GraphKey.of(2, 64, 64, (0, 1, 2), False),
        GraphKey.of(4, 64, 128, (0, 1, 2), False),
        GraphKey.of(4, 64, 64, (0, 1), False),
        GraphKey.of(4, 64, 64, (0, 1, 2), True),
    ]
    assert len({base, *others}) == 5
    # The guidance scale is a buffer the graph reads, not part of what a capture bakes in.
    assert "cfg_scale" not in {f.name for f in dataclasses.fields(GraphKey)}


def test_rank_shares_cover_all_seeds_once():
    seeds = list(range(11))
    shares = [shard(seeds, r, 3) for r in range(3)]
    assert sorted(s for share in shares for s in share) == seeds
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    info = rank_info({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (1, 2, 1, 2)
    assert rank_info({}).world_size == 1


# --------------------------------------------------------------------------- GPU-side checks, on the fake GPU
def test_gpu_bf16_needs_compute_capability_8():
    """Emulated bf16 (what torch.cuda.is_bf16_supported counts on a T4) is refused, native bf16 is taken."""
    from runtimes.backends.precision import resolve_precision
    from runtimes.errors import BackendError
    from tests.fakes.cuda import FakeCuda

    turing, hopper = FakeCuda(name="Tesla T4", capability=(7, 5)), FakeCuda(capability=(9, 0))
    cpu = torch.device("cpu")  # the fake GPU's memory is host memory
    with pytest.raises(BackendError, match=r"Tesla T4 is compute capability 7.5: bf16 tensor cores need 8.0"):
        resolve_precision("bf16", cpu, cuda=turing)
    assert resolve_precision("auto", cpu, cuda=turing)[0] == "fp32"
    assert resolve_precision("bf16", cpu, cuda=hopper) == (
        "bf16",
        "requested, NVIDIA H200 (fake) (compute capability 9.0) has bf16 tensor cores",
    )
    assert resolve_precision("auto", cpu, cuda=hopper)[0] == "bf16"


def test_torch_backend_on_a_gpu_refuses_a_batch_beyond_its_free_memory():
    from lego_model.errors import ShapeError
    from runtimes.backends.torch_backend import TorchBackend
    from runtimes.chain import BrickChain
    from tests.fakes.cuda import FakeCuda
    from tests.runtimes.conftest import tiny_model

    cuda = FakeCuda(memory=64 << 20)
    backend = TorchBackend(tiny_model("tiny_PG_16"), device="cpu", cuda=cuda)
    chain = BrickChain(backend)
    chain.check(2, 64, 64)  # fits
    with pytest.raises(ShapeError, match=r"4 canvases of 2048x2048 need at least .* GiB is available on cpu"):
        chain.check(2, 2048, 2048, cfg_scale=1.5)  # guidance doubles the rows
