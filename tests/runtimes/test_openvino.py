"""The OpenVINO backend and run-time precisions: parity with eager, bf16, model cache, zero-copy I/O, refusals."""

from __future__ import annotations

import builtins
import itertools

import pytest
import torch
from click.testing import CliRunner

from lego_model.flops import usable_cores
from runtimes.backends import choose_backend, open_backend
from runtimes.backends.openvino import openvino_available
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from runtimes.errors import BackendError
from runtimes.sample import main
from tests.runtimes.conftest import export_onnx_dir, tiny_model

CPU = torch.device("cpu")
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed (the cpu extra)")


def has_bf16_units() -> bool:
    from runtimes.backends.precision import cpu_bf16_units

    return bool(cpu_bf16_units())


needs_bf16 = pytest.mark.skipif(not has_bf16_units(), reason="this CPU has no bf16 units (AMX / AVX512-BF16)")
# bf16 keeps 8 significant bits (relative step 2^-8 = 0.4 %).  D is dominated by c_skip * x, which stays fp32;
# measured on tiny_PG_16: 1.4e-3 (OpenVINO) and 1.0e-3 (torch autocast) without guidance, 2.0e-3 / 1.3e-3 with.
BF16_REL = 1e-2


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Compiled OpenVINO blobs of these tests go to a temporary cache, not ~/.cache."""
    monkeypatch.setenv("LEGO_CACHE_DIR", str(tmp_path / "cache"))


def all_patterns(n: int) -> list[tuple[int, ...]]:
    return [act for r in range(1, n + 1) for act in itertools.combinations(range(n), r)]


def inputs(batch: int, height: int, width: int, label_dim: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64) * 2
    sigma = torch.tensor([0.02, 0.7, 5.0, 40.0][:batch], dtype=torch.float64)
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim] if label_dim else None
    return x, sigma, labels


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def chain_outputs(backend, labels, x, sigma, height, width, cfg_scale, patterns):
    with backend, torch.no_grad():
        chain = BrickChain(backend)
        kw = dict(batch=x.shape[0], height=height, width=width, cfg_scale=cfg_scale)
        with chain.batch(labels, **kw) as denoise:
            return {act: denoise(x, sigma, act).clone() for act in patterns}


@needs_openvino
@pytest.mark.parametrize("cfg_scale", [None, 1.5])
def test_openvino_fp32_chain_equals_eager_for_every_skip_pattern(engines_pg, cfg_scale):
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(2, 32, 16, 10)  # non-square
    backend, _ = open_backend("openvino", engine_dir=engines_pg, threads=1, precision="fp32")
    assert backend.precision == "fp32"
    got = chain_outputs(backend, labels, x, sigma, 32, 16, cfg_scale, all_patterns(3))
    for act, out in got.items():
        want = model(x, sigma, labels, act, cfg_scale)
        assert rel_l2(out, want) <= 1e-4, f"active {act}: relative L2 {rel_l2(out, want):.2e}"


@needs_openvino
def test_openvino_unconditional_engines_match_eager(engines_pr):
    model = tiny_model("tiny_PR_16")
    x, sigma, _ = inputs(3, 16, 16, 0)
    backend, _ = open_backend("openvino", engine_dir=engines_pr, threads=1, precision="fp32")
    for act, out in chain_outputs(backend, None, x, sigma, 16, 16, None, all_patterns(3)).items():
        assert rel_l2(out, model(x, sigma, None, act)) <= 1e-4, f"active {act}"


@needs_openvino
@needs_bf16
def test_openvino_bf16_is_within_bf16_tolerance_of_fp32(engines_pg):
    x, sigma, labels = inputs(2, 16, 32, 10)
    runs = {}
    for precision in ("fp32", "bf16"):
        backend, _ = open_backend("openvino", engine_dir=engines_pg, threads=1, precision=precision)
        assert backend.precision == precision
        runs[precision] = chain_outputs(backend, labels, x, sigma, 16, 32, 2.0, all_patterns(3))
    for act in all_patterns(3):
        err = rel_l2(runs["bf16"][act], runs["fp32"][act])
        assert 0 < err <= BF16_REL, f"active {act}: bf16 vs fp32 relative L2 {err:.2e}"


@needs_bf16
@pytest.mark.parametrize("kind", ["openvino", "torch"])
def test_bf16_is_right_on_a_brick_with_an_8x8_patch_of_8_channels(kind, tmp_path):
    # lego_S_PG_64's brick1 geometry (patch 8, x_in 5 + f_prev 3 channels, D 384): oneDNN's AMX bf16
    # convolution (OpenVINO 2026.4's and torch's autocast) returned wrong numbers here (relative L2 0.25-1.1);
    # as a matmul on patches (lego_model.forwards.PatchLinear) it is right.
    from lego_model import LegoConfig, LegoModel

    if kind == "openvino" and not openvino_available():
        pytest.skip("openvino is not installed")
    config = LegoConfig("patch8", (4, 16), (2, 8), (1, 1), 384, 6, label_dim=10)
    model = LegoModel(config).randomize_(0).eval()
    engines = export_onnx_dir(model, tmp_path / "engines") if kind == "openvino" else None
    x, sigma, labels = inputs(2, 32, 32, 10)
    runs = {}
    for precision in ("fp32", "bf16"):
        if kind == "openvino":
            backend, _ = open_backend("openvino", engine_dir=engines, threads=1, precision=precision)
        else:
            backend = TorchBackend(model, device=CPU, precision=precision)
        runs[precision] = chain_outputs(backend, labels, x, sigma, 32, 32, None, [(1,), (0, 1)])
    for act, out in runs["bf16"].items():
        err = rel_l2(out, runs["fp32"][act])
        assert err <= BF16_REL, f"active {act}: bf16 vs fp32 relative L2 {err:.2e}"


def test_snippets_are_on_only_for_bricks_of_long_tiles_whose_token_count_is_not_the_head_count():
    from lego_model import LegoConfig
    from lego_model.configs import get_config
    from runtimes.backends.openvino import snippets_for

    s64 = get_config("lego_S_PG_64")  # tiles of 4, 4 and 1024 tokens, 6 heads
    assert [snippets_for(s64, k) for k in (None, 0, 1, 2)] == [False, False, False, True]
    assert not any(snippets_for(get_config("digits_pg_16"), k) for k in range(3))  # 4, 16 and 64 tokens
    # 256 tokens per tile and 256 heads: where OpenVINO 2026.4's fused fp32 attention miscomputed (tokens == heads).
    assert not snippets_for(LegoConfig("eq", (32,), (2,), (1,), 256, 256), 0)


@needs_openvino
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=needs_bf16)])
def test_a_brick_of_long_tiles_runs_fused_by_snippets_and_matches_eager(precision, tmp_path):
    from lego_model import LegoConfig, LegoModel

    config = LegoConfig("long_tiles", (4, 32), (2, 2), (1, 1), 64, 4, label_dim=10)  # brick1: 256-token tiles
    model = LegoModel(config).randomize_(0).eval()
    engines = export_onnx_dir(model, tmp_path / "engines")
    x, sigma, labels = inputs(2, 32, 32, 10)
    backend, _ = open_backend("openvino", engine_dir=engines, threads=1, precision=precision)
    kinds = {}
    with backend, torch.no_grad():
        with BrickChain(backend).batch(labels, batch=2, height=32, width=32) as denoise:
            got = {act: denoise(x, sigma, act).clone() for act in all_patterns(2)}
        for name, request in backend.requests.items():
            ops = request.get_compiled_model().get_runtime_model().get_ops()
            kinds[name] = {op.get_rt_info()["layerType"].astype(str) for op in ops}
    assert "Subgraph" in kinds["brick1"] and "Softmax" not in kinds["brick1"]  # attention fused by snippets
    assert "Softmax" in kinds["brick0"]  # 4-token tiles: not fused
    # fp32: the parity bound of the fp32 chain test above (fused kernels reorder fp32 sums); bf16: BF16_REL.
    tolerance = 1e-4 if precision == "fp32" else BF16_REL
    for act, out in got.items():
        want = model(x, sigma, labels, act, None)
        assert rel_l2(out, want) <= tolerance, f"active {act}: relative L2 {rel_l2(out, want):.2e}"


@needs_openvino
def test_second_load_comes_from_the_model_cache(engines_pg, tmp_path):
    cache = tmp_path / "ov-cache"
    from export.manifest import load_manifest
    from runtimes.backends.openvino import OpenVinoBackend

    manifest = load_manifest(engines_pg)
    x, sigma, labels = inputs(1, 16, 16, 10)
    loads = []
    for _ in range(2):
        with OpenVinoBackend(manifest, engines_pg, precision="fp32", threads=1, cache_dir=cache) as backend:
            assert backend.loaded_from_cache == {}  # nothing compiled before a call names its shape
            chain_outputs(backend, labels, x, sigma, 16, 16, None, [(0, 1, 2)])
            loads.append(dict(backend.loaded_from_cache))
    assert set(loads[0]) == {"embedder", "brick0", "brick1", "brick2"}
    assert not any(loads[0].values()) and all(loads[1].values()), loads
    assert len(list((cache / "fp32").iterdir())) == 4  # one blob per engine and shape, kept per precision


@needs_openvino
def test_each_input_shape_is_compiled_once_and_at_most_shapes_per_engine_are_kept(engines_pg):
    from runtimes.backends.openvino import SHAPES_PER_ENGINE

    backend, _ = open_backend("openvino", engine_dir=engines_pg, threads=1, precision="fp32")
    sizes = [(1, 16, 16), (2, 16, 16), (1, 32, 16), (1, 16, 32), (1, 32, 32)]
    assert len(sizes) > SHAPES_PER_ENGINE
    with backend, torch.no_grad():
        chain = BrickChain(backend)
        first = None
        for batch, h, w in [*sizes, sizes[0]]:  # the first shape again, after it was dropped
            x, sigma, labels = inputs(batch, h, w, 10)
            with chain.batch(labels, batch=batch, height=h, width=w) as denoise:
                out = denoise(x, sigma, (0, 1, 2)).clone()
                request = backend.requests["brick2"]
                denoise(x, sigma, (0, 1, 2))
                assert backend.requests["brick2"] is request  # the same shape reuses its compiled request
            first = out if first is None else first
            assert len(backend._shaped["brick2"]) <= SHAPES_PER_ENGINE
        shapes = [dict(k)["x_in"][2:] for k in backend._shaped["brick2"].keys()]
        assert shapes == [(32, 16), (16, 32), (32, 32), (16, 16)], shapes  # least recently used first out
        torch.testing.assert_close(out, first, rtol=0, atol=0)  # recompiled, the same numbers


def test_the_embedder_runs_on_one_thread_below_its_flop_threshold_and_bricks_on_all_of_them():
    from lego_model import get_config
    from lego_model.flops import embedder_flops
    from runtimes.backends.openvino import EMBEDDER_ONE_THREAD_FLOPS, threads_for

    cfg = get_config("digits_pg_16")
    small = max(r for r in range(1, 4096) if embedder_flops(cfg, r) < EMBEDDER_ONE_THREAD_FLOPS)
    assert threads_for(cfg, "embedder", small, 2) == 1
    assert threads_for(cfg, "embedder", small + 1, 2) == 2  # big enough to split
    assert threads_for(cfg, "brick", 1, 2) == 2  # measured: the bricks gain from a second thread at every batch


@needs_openvino
@pytest.mark.skipif(usable_cores() < 2, reason="needs 2 usable cores to tell one thread from the backend's")
def test_the_backend_compiles_the_embedder_with_its_thread_choice(engines_pg):
    x, sigma, labels = inputs(2, 16, 16, 10)
    backend, _ = open_backend("openvino", engine_dir=engines_pg, threads=2, precision="fp32")
    with backend, torch.no_grad():
        chain = BrickChain(backend)
        with chain.batch(labels, batch=2, height=16, width=16) as denoise:
            denoise(x, sigma, (0, 1, 2))

        def threads(engine: str) -> int:
            return int(backend.requests[engine].get_compiled_model().get_property("INFERENCE_NUM_THREADS"))

        assert (threads("embedder"), threads("brick0")) == (1, 2)


@needs_openvino
def test_requests_are_bound_to_the_chain_buffers_and_rebound_when_they_change(engines_pg):
    x, sigma, labels = inputs(2, 16, 16, 10)
    backend, _ = open_backend("openvino", engine_dir=engines_pg, threads=1, precision="fp32")
    with backend, torch.no_grad():
        chain = BrickChain(backend)

        def reads(engine: str, name: str) -> int:
            return backend.requests[engine].get_tensor(name).data.ctypes.data

        with chain.batch(labels, batch=2, height=16, width=16) as denoise:
            denoise(x, sigma, (0, 1, 2))  # brick1 reads f0 (written by brick0), writes f1
            bufs = chain._buffers[(2, 16, 16, False)]
            slots = bufs.slots
            assert reads("embedder", "cond") == bufs.cond.data_ptr()
            assert reads("brick1", "f_prev") == slots["f0"].data_ptr()
            assert reads("brick1", "f") == slots["f1"].data_ptr()
            first = denoise(x, sigma, (1, 2)).clone()  # brick1 first: reads the zeros, writes f0
            assert reads("brick1", "f_prev") == slots["zeros"].data_ptr()
            assert reads("brick1", "f") == slots["f0"].data_ptr()
        with chain.batch(labels[:1], batch=1, height=32, width=16) as denoise:  # another shape: other buffers
            denoise(x[:1].repeat(1, 1, 2, 1), sigma[:1], (1, 2))
            assert reads("brick1", "f_prev") == chain._buffers[(1, 32, 16, False)].slots["zeros"].data_ptr()
        with chain.batch(labels, batch=2, height=16, width=16) as denoise:
            torch.testing.assert_close(denoise(x, sigma, (1, 2)), first, rtol=0, atol=0)


def test_auto_takes_openvino_on_a_cpu_when_installed_else_onnxruntime():
    cpu_only = {"tensorrt": "no TensorRT engines", "onnxruntime-cuda": "no CUDA", "onnxruntime-cpu": None}
    name, why = choose_backend("auto", {**cpu_only, "openvino": None})
    assert name == "openvino" and "fastest CPU backend" in why
    name, why = choose_backend("auto", {**cpu_only, "openvino": "OpenVINO not installed (pip install ...)"})
    assert name == "onnxruntime-cpu" and "OpenVINO not installed" in why
    assert choose_backend("auto", {**cpu_only, "onnxruntime-cuda": None, "openvino": None})[0] == "onnxruntime-cuda"


@pytest.fixture
def without_openvino(monkeypatch):
    """Make ``import openvino`` fail as on a machine without the package."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr("runtimes.backends.openvino.openvino_available", lambda: False)


def one_line_error(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def test_openvino_missing_is_one_line_naming_the_extra(engines_pg, without_openvino, tmp_path):
    with pytest.raises(BackendError, match=r"openvino is not installed: pip install 'lego-deploy\[cpu\]'"):
        open_backend("openvino", engine_dir=engines_pg)
    args = ["--quiet", "--engine-dir", str(engines_pg), "--backend", "openvino", "--out", str(tmp_path / "o")]
    one_line_error(CliRunner().invoke(main, args), "pip install 'lego-deploy[cpu]'")
    assert not (tmp_path / "o").exists()  # refused before anything was written
    backend, why = open_backend("auto", engine_dir=engines_pg)
    assert backend.name == "onnxruntime-cpu" and "openvino: openvino is not installed" in why


def test_bf16_on_a_cpu_without_bf16_units_is_refused_offering_fp32(engines_pg, monkeypatch, tmp_path):
    monkeypatch.setattr("runtimes.backends.precision.cpu_bf16_units", lambda: [])
    with pytest.raises(BackendError, match="no bf16 units.*use --precision fp32"):
        TorchBackend(tiny_model("tiny_PG_16"), device=CPU, precision="bf16")
    if openvino_available():
        with pytest.raises(BackendError, match="no bf16 units.*use --precision fp32"):
            open_backend("openvino", engine_dir=engines_pg, precision="bf16")
        backend, _ = open_backend("openvino", engine_dir=engines_pg, precision="auto")
        assert backend.precision == "fp32" and "no bf16 units" in backend.precision_why
        args = ["--quiet", "--engine-dir", str(engines_pg), "--backend", "openvino", "--precision", "bf16"]
        one_line_error(CliRunner().invoke(main, [*args, "--out", str(tmp_path / "o")]), "use --precision fp32")


def test_file_precision_backends_refuse_another_run_time_precision(engines_pg):
    pytest.importorskip("onnxruntime")
    with pytest.raises(BackendError, match=r"exported in \(fp32\), not bf16; use --backend openvino or torch"):
        open_backend("onnxruntime-cpu", engine_dir=engines_pg, precision="bf16")
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, precision="fp32")
    assert backend.precision == "fp32"


@needs_bf16
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_torch_bf16_is_within_bf16_tolerance_of_fp32(cfg_scale):
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(2, 16, 32, 10)
    runs = {}
    for precision in ("fp32", "bf16"):
        backend = TorchBackend(model, device=CPU, precision=precision)
        runs[precision] = chain_outputs(backend, labels, x, sigma, 16, 32, cfg_scale, all_patterns(3))
    for act in all_patterns(3):
        torch.testing.assert_close(runs["fp32"][act], model(x, sigma, labels, act, cfg_scale), rtol=0, atol=0)
        err = rel_l2(runs["bf16"][act], runs["fp32"][act])
        assert 0 < err <= BF16_REL, f"active {act}: torch bf16 vs fp32 relative L2 {err:.2e}"


@needs_openvino
def test_cli_samples_through_openvino_and_says_which_precision_and_why(engines_pg, tmp_path):
    out = tmp_path / "samples"
    args = ["--quiet", "--threads", "1", "--engine-dir", str(engines_pg), "--seeds", "0-1", "--steps", "3"]
    result = CliRunner().invoke(main, [*args, "--backend", "openvino", "--precision", "fp32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "backend: openvino (requested)" in result.output and "precision fp32 (requested)" in result.output
    assert (out / "000001.png").is_file()
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "auto")])  # auto on this CPU
    assert result.exit_code == 0, result.output
    assert "backend: openvino" in result.output and "auto: the CPU" in result.output


@needs_openvino
def test_a_non_contiguous_buffer_is_refused_in_one_line(engines_pg):
    from runtimes.backends.base import EngineCall
    from runtimes.errors import UsageError

    backend, _ = open_backend("openvino", engine_dir=engines_pg, threads=1, precision="fp32")
    with backend:
        labels = torch.eye(10)[:2]
        c_noise = torch.zeros(2, 2)[:, 0]  # a strided view
        with pytest.raises(UsageError, match="embedder.c_noise: pass a contiguous CPU tensor"):
            backend.infer(EngineCall("embedder", None, None, "cond"), {"c_noise": c_noise, "class_labels": labels},
                          {"cond": torch.empty(2, 64)})  # fmt: skip
