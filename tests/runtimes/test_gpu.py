"""CUDA graphs and TensorRT: run only where a GPU (and TensorRT) is present, skip cleanly elsewhere."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lego_model.sampler import draw_latents, edm_sample
from lego_model.skip import SkipPlan
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from tests.runtimes.conftest import tiny_model

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_trt = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None, reason="needs TensorRT and a GPU"
)


def sample(chain: BrickChain, seeds, steps: int, plan: SkipPlan, cfg_scale=None, height=16, width=32):
    cfg = chain.config
    latents, labels, _ = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim)
    kw = dict(batch=len(seeds), height=height, width=width, cfg_scale=cfg_scale, num_steps=steps)
    with chain.batch(labels, **kw) as denoise:
        return edm_sample(denoise, latents.to(chain.device), num_steps=steps, active_per_step=plan.steps(steps))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("cfg_scale", [None, 2.0])
def test_cuda_graphs_equal_eager_chain_and_capture_once_per_key(cfg_scale):
    model = tiny_model("tiny_PG_16")
    plan = SkipPlan.parse(["2@0.5:1"], model.config)
    device = torch.device("cuda", 0)
    with TorchBackend(model, device=device) as backend, torch.no_grad():
        plain = sample(BrickChain(backend, cuda_graphs=False), [0, 1], 6, plan, cfg_scale)
        chain = BrickChain(backend, cuda_graphs=True)
        assert chain.graphs is not None
        graphed = sample(chain, [0, 1], 6, plan, cfg_scale)
        assert len(chain.graphs) == 2  # two active sets in the plan
        captures = chain.graphs.captures
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        again = sample(chain, [0, 1], 6, plan, cfg_scale)
        assert chain.graphs.captures == captures  # replays only
        torch.testing.assert_close(again, graphed, atol=1e-6, rtol=1e-6)
        del again
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated(device) <= before  # no growth across a replayed run
    torch.testing.assert_close(graphed, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_a_new_guidance_scale_replays_the_captured_graphs():
    model = tiny_model("tiny_PG_16")
    plan = SkipPlan.parse(["2@0.5:1"], model.config)
    with TorchBackend(model, device=torch.device("cuda", 0)) as backend:
        chain = BrickChain(backend, cuda_graphs=True)
        sample(chain, [0, 1], 6, plan, 2.0)
        captures = chain.graphs.captures
        graphed = sample(chain, [0, 1], 6, plan, 3.5)
        assert chain.graphs.captures == captures  # the scale is read from a device tensor
        plain = sample(BrickChain(backend, cuda_graphs=False), [0, 1], 6, plan, 3.5)
    torch.testing.assert_close(graphed, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@needs_gpu
def test_nonfinite_is_reported_at_the_end_of_a_graphed_batch():
    from runtimes.errors import NonFiniteError

    model = tiny_model("tiny_PG_16")
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(float("inf"))
    with TorchBackend(model, device=torch.device("cuda", 0)) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        with pytest.raises(NonFiniteError, match=r"brick 1 \(torch, fp32\) produced NaN/Inf at sampling step 0 of 3"):
            sample(chain, [0], 3, SkipPlan(3))


@pytest.mark.trt
@needs_trt
def test_tensorrt_chain_matches_eager(tmp_path):
    from export.pipeline import ExportOptions, export_engine_dir
    from runtimes.backends import open_backend

    model = tiny_model("tiny_PG_16")
    engine_dir = export_engine_dir(
        model, tmp_path / "trt", {"path": None, "sha256": None, "random_init_seed": 0}, ExportOptions(engines="trt")
    ).out
    backend, why = open_backend("auto", engine_dir=engine_dir)
    assert backend.name == "tensorrt", why
    x = torch.randn(2, 3, 16, 32, dtype=torch.float64)
    sigma = torch.tensor([0.3, 4.0], dtype=torch.float64)
    labels = torch.eye(10)[[2, 5]]
    with backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        with chain.batch(labels.cuda(), batch=2, height=16, width=32) as denoise:
            for act in [(0, 1, 2), (1, 2), (0,), (0, 2)]:
                for _ in range(2):  # first call captures, second replays
                    got = denoise(x.cuda(), sigma.cuda(), act).cpu()
                torch.testing.assert_close(got, model(x, sigma, labels, act), atol=1e-3, rtol=1e-3)


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
                # TF32 convolutions and matmuls on the GPU: looser than the CPU parity.
                torch.testing.assert_close(got, model(x, sigma, labels, act, 1.5), atol=2e-3, rtol=2e-3)
