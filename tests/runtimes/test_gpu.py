"""The GPU path on a real GPU (and TensorRT where installed); skipped cleanly elsewhere.

The CPU suite checks the same code on the fake GPU and the fake TensorRT (tests/fakes); these tests confirm it
where only hardware can: real captures and replays, TensorRT's own contexts and kernels.  fp32 comparisons
run with TF32 off (matmuls and cuDNN convolutions), so that they compare fp32 rounding.  Run by
``bash benchmarks/gpu.sh``.
"""

from __future__ import annotations

import importlib.util
import threading

import pytest
import torch

from lego_model.sampler import draw_latents, edm_sample
from lego_model.skip import SkipPlan
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from tests.runtimes.conftest import tiny_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
    reason="needs TensorRT (the gpu extra) and a GPU",
)
GPU = torch.device("cuda", 0)
# Graphs replay the kernels of their capture: one call equals the uncaptured call to fp32 rounding of the
# same kernels (0 in practice); a 6-step run moves that through the ODE, |x| <= 80.
CALL_TOL = 1e-5
RUN_TOL = 1e-4


@pytest.fixture(autouse=True)
def no_tf32():
    if not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def run(chain: BrickChain, seeds, steps: int, plan: SkipPlan, cfg_scale=None, height=16, width=32, whole=True,
        churn=None):  # fmt: skip
    """One sampling run on the chain's device: chain.sample (the whole-loop graph) or edm_sample (per call)."""
    cfg = chain.config
    latents, labels, rnd = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim)
    latents, labels = latents.to(chain.device), labels.to(chain.device)
    randn = lambda x: rnd.randn(x.shape, dtype=x.dtype).to(x.device)  # noqa: E731  per-seed CPU generators
    kw = dict(batch=len(seeds), height=height, width=width, cfg_scale=cfg_scale, num_steps=steps)
    churn = churn or {}
    with chain.batch(labels, **kw) as denoise:
        if whole:
            return chain.sample(latents, num_steps=steps, active_per_step=plan.steps(steps), randn_like=randn, **churn)
        return edm_sample(denoise, latents, num_steps=steps, active_per_step=plan.steps(steps), randn_like=randn,
                          **churn)  # fmt: skip


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_per_call_and_whole_loop_graphs_equal_no_graphs(cfg_scale):
    model = tiny_model("tiny_PG_16")
    plan = SkipPlan.parse(["2@0.5:1"], model.config)
    churn = {"S_churn": 20.0, "S_min": 0.05, "S_max": 50.0}
    with TorchBackend(model, device=GPU) as backend, torch.no_grad():
        plain = run(BrickChain(backend), [0, 1], 6, plan, cfg_scale, whole=False, churn=churn)
        chain = BrickChain(backend, cuda_graphs=True)
        per_call = run(chain, [0, 1], 6, plan, cfg_scale, whole=False, churn=churn)
        assert len(chain.graphs) == 2  # two active sets in the plan
        whole = run(chain, [0, 1], 6, plan, cfg_scale, churn=churn)
        captures = chain.graphs.captures
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(GPU)
        again = run(chain, [0, 1], 6, plan, cfg_scale, churn=churn)
        assert chain.graphs.captures == captures  # replayed
        torch.testing.assert_close(again, whole, atol=0, rtol=0)
        del again
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(GPU) <= before  # a replayed run allocates nothing that stays
    torch.testing.assert_close(per_call, plain, atol=RUN_TOL, rtol=0)
    torch.testing.assert_close(whole, plain, atol=RUN_TOL, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_new_seeds_and_guidance_scale_replay_the_whole_loop_graph():
    model = tiny_model("tiny_PG_16")
    plan = SkipPlan.parse(["2@0.5:1"], model.config)
    with TorchBackend(model, device=GPU) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        run(chain, [0, 1], 6, plan, 2.0)
        captures = chain.graphs.captures
        graphed = run(chain, [3, 4], 6, plan, 3.5)
        assert chain.graphs.captures == captures  # latents, labels and the scale are read from buffers
        plain = run(BrickChain(backend), [3, 4], 6, plan, 3.5, whole=False)
    torch.testing.assert_close(graphed, plain, atol=RUN_TOL, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_chains_in_threads_on_one_backend_get_their_own_images():
    model = tiny_model("tiny_PG_16")
    plan = SkipPlan(model.config.num_bricks)
    results, errors = {}, []
    with TorchBackend(model, device=GPU) as backend, torch.no_grad():

        def worker(i):
            try:
                chain = BrickChain(backend, cuda_graphs=True)
                results[i] = [run(chain, [i, i + 10], 4, plan).cpu() for _ in range(3)]
            except Exception as err:
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i in range(3):
            want = run(BrickChain(backend), [i, i + 10], 4, plan, whole=False).cpu()
            for got in results[i]:
                torch.testing.assert_close(got, want, atol=RUN_TOL, rtol=0)


@pytest.mark.gpu
@needs_gpu
def test_nonfinite_is_reported_at_the_end_of_a_graphed_batch():
    from runtimes.errors import NonFiniteError

    model = tiny_model("tiny_PG_16")
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(float("inf"))
    with TorchBackend(model, device=GPU) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        with pytest.raises(NonFiniteError, match=r"brick 1 \(torch, fp32\) produced NaN/Inf at sampling step 0 of 3"):
            run(chain, [0], 3, SkipPlan(3))


@pytest.fixture(scope="module")
def trt_engines(tmp_path_factory):
    from export.manifest import CheckpointRecord
    from export.pipeline import ExportOptions, export_engine_dir
    from export.specs import default_profile

    model = tiny_model("tiny_PG_16")
    out = tmp_path_factory.mktemp("trt") / "engines"
    options = ExportOptions(engines="trt", profile=default_profile(model.config))
    export_engine_dir(model, out, CheckpointRecord.random_init(0), options)
    return model, out


@pytest.mark.trt
@needs_trt
def test_tensorrt_graphs_keep_their_contexts_across_interleaved_keys(trt_engines):
    """Capture key A, capture B (another batch and skip pattern: other shapes and addresses for the same
    engines), then replay A: each graph must still run on the context it captured (defect 1)."""
    from runtimes.backends import open_backend

    model, engine_dir = trt_engines
    backend, _ = open_backend("tensorrt", engine_dir=engine_dir)
    g = torch.Generator().manual_seed(0)
    cases = {
        "A": (torch.randn(2, 3, 16, 32, generator=g, dtype=torch.float64), torch.eye(10)[[2, 5]], (0, 1, 2)),
        "B": (torch.randn(1, 3, 16, 16, generator=g, dtype=torch.float64), torch.eye(10)[[7]], (1, 2)),
    }
    sigma = {"A": torch.tensor([0.3, 4.0], dtype=torch.float64), "B": torch.tensor([1.5], dtype=torch.float64)}
    with backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        for name in ["A", "B", "A", "B", "A"]:  # capture, capture, replay, replay, replay
            x, labels, act = cases[name]
            B, _, H, W = x.shape
            with chain.batch(labels.to(GPU), batch=B, height=H, width=W, cfg_scale=1.5) as denoise:
                for _ in range(2):
                    got = denoise(x.to(GPU), sigma[name].to(GPU), act).cpu()
            want = model(x, sigma[name], labels, act, 1.5)
            # fp32 engines, TF32 off in the builder: TensorRT's own kernels and fusions, 1e-4 relative.
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        assert chain.graphs.captures == 2


@pytest.mark.trt
@needs_trt
def test_tensorrt_whole_loop_graph_equals_the_uncaptured_chain(trt_engines):
    from runtimes.backends import open_backend

    model, engine_dir = trt_engines
    plan = SkipPlan.parse(["2@0.5:1"], model.config)
    backend, _ = open_backend("tensorrt", engine_dir=engine_dir)
    with backend, torch.no_grad():
        plain = run(BrickChain(backend), [0, 1], 6, plan, 2.0, whole=False)
        chain = BrickChain(backend, cuda_graphs=True)
        whole = run(chain, [0, 1], 6, plan, 2.0)
        again = run(chain, [0, 1], 6, plan, 2.0)
    torch.testing.assert_close(whole, plain, atol=RUN_TOL, rtol=0)
    torch.testing.assert_close(again, whole, atol=0, rtol=0)


def _ort_cuda() -> bool:
    from runtimes.backends.ort import cuda_provider_available

    return cuda_provider_available()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not _ort_cuda(), reason="needs onnxruntime-gpu and a GPU")
def test_onnxruntime_cuda_chain_matches_eager(engines_pg):
    from runtimes.backends import open_backend

    model = tiny_model("tiny_PG_16")
    backend, _ = open_backend("onnxruntime-cuda", engine_dir=engines_pg)
    x = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    labels = torch.eye(10)[[2, 5]]
    with backend, torch.no_grad():
        chain = BrickChain(backend)
        with chain.batch(labels.cuda(), batch=2, height=16, width=32, cfg_scale=1.5) as denoise:
            for act in [(0, 1, 2), (1, 2), (0,)]:
                got = denoise(x.cuda(), sigma.cuda(), act).cpu()
                # ONNX Runtime's CUDA provider uses TF32 by default unless told otherwise: looser than the CPU.
                torch.testing.assert_close(got, model(x, sigma, labels, act, 1.5), atol=2e-3, rtol=2e-3)
