"""The TensorRT backend on the fake TensorRT and the fake GPU (tests/fakes): contexts, graphs, threads, streams.

The fake plans run the tiny model's own embedder and bricks, so every call is compared with the eager model
exactly; the fakes raise where TensorRT's or CUDA's rules are broken (see tests/fakes/tensorrt.py).
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from lego_model.sampler import draw_latents, edm_sample
from runtimes.backends.trt import TensorRTBackend
from runtimes.chain import BrickChain
from tests.fakes.cuda import FakeCuda
from tests.fakes.engines import fake_tensorrt_dir
from tests.fakes.tensorrt import FakeTensorRT
from tests.runtimes.conftest import tiny_model

CPU = torch.device("cpu")  # the fake GPU's memory


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny_PG_16")


@pytest.fixture
def fake(monkeypatch):
    """(fake GPU, fake TensorRT) with ``import tensorrt`` giving the fake."""
    cuda = FakeCuda()
    trt = FakeTensorRT(cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt.module())
    return cuda, trt


@pytest.fixture
def backend(fake, model, tmp_path):
    from export.manifest import load_manifest

    cuda, trt = fake
    engine_dir = fake_tensorrt_dir(model, tmp_path / "engines", trt)
    return TensorRTBackend(load_manifest(engine_dir), engine_dir, device=CPU, cuda=cuda)


def _inputs(batch: int, height: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64) * 2
    sigma = torch.tensor([0.02, 0.7, 5.0, 40.0][:batch], dtype=torch.float64)
    return x, sigma, torch.eye(10)[(torch.arange(batch) + seed) % 10]


def test_graphs_never_change_a_context_they_captured(backend, model):
    """Defect 1: one context per engine, re-shaped and re-addressed per call, under graphs of other keys.

    Keys in turn: batch 2 with all bricks, the same batch without brick 0 (brick 1 then reads zeros instead
    of f0), batch 1 under guidance, another chain's buffers; then all of them again (replays).
    """
    with backend, torch.no_grad():
        chains = [BrickChain(backend, cuda_graphs=True), BrickChain(backend, cuda_graphs=True)]
        calls = [
            (chains[0], 2, None, (0, 1, 2)),
            (chains[0], 2, None, (1, 2)),
            (chains[0], 1, 2.0, (0, 1, 2)),
            (chains[1], 2, None, (0, 1, 2)),
        ]
        for _ in range(2):
            for chain, batch, scale, act in calls:
                x, sigma, labels = _inputs(batch, 16, 16)
                with chain.batch(labels, batch=batch, height=16, width=16, cfg_scale=scale) as denoise:
                    for _ in range(2):  # the first call of a key captures, the second replays
                        got = denoise(x, sigma, act)
                        torch.testing.assert_close(got, model(x, sigma, labels, act, scale), atol=0, rtol=0)
        assert chains[0].graphs.replays > 0


def _sample(chain, seeds, steps=3, whole=False):
    cfg = chain.config
    latents, labels, _ = draw_latents(seeds, cfg.img_channels, 16, 16, cfg.label_dim)
    with chain.batch(labels, batch=len(seeds), height=16, width=16, num_steps=steps) as denoise:
        if whole:
            return chain.sample(latents, num_steps=steps)
        return edm_sample(denoise, latents, num_steps=steps, all_bricks=(0, 1, 2))


@pytest.mark.parametrize("graphs", [False, True], ids=["no-graphs", "graphs"])
def test_chains_in_threads_never_run_two_contexts_on_the_shared_scratch_at_once(fake, backend, model, graphs):
    """Defect 2: every context of the backend shares one scratch allocation; threads with chains of their own
    (each on a stream of its own, as a server's workers are) must not overlap on it."""
    cuda, _ = fake
    results, errors = {}, []
    with backend, torch.no_grad():

        def worker(i):
            try:
                with cuda.use_stream(cuda.new_stream(None)):
                    chain = BrickChain(backend, cuda_graphs=graphs)
                    results[i] = [_sample(chain, [i, 10 + i]) for _ in range(2)]
            except Exception as err:
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors
    for i in range(3):
        with torch.no_grad():
            latents, labels, _ = draw_latents([i, 10 + i], 3, 16, 16, 10)
            want = edm_sample(lambda x, s, a, labels=labels: model(x, s, labels, a), latents, num_steps=3,
                              all_bricks=(0, 1, 2))  # fmt: skip
        for got in results[i]:
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_engines_never_run_on_the_legacy_default_stream(backend, model):
    """Defect 4: without graphs the chain runs on torch's current stream, the legacy default stream 0."""
    x, sigma, labels = _inputs(2, 16, 32)
    with backend, torch.no_grad():
        with BrickChain(backend).batch(labels, batch=2, height=16, width=32) as denoise:
            for act in [(0, 1, 2), (2,)]:
                torch.testing.assert_close(denoise(x, sigma, act), model(x, sigma, labels, act), atol=0, rtol=0)


def test_a_whole_run_through_tensorrt_is_one_graph(backend, model):
    with backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        first = _sample(chain, [0, 1], whole=True)
        again = _sample(chain, [4, 5], whole=True)
        assert chain.graphs.captures == 1 and chain.graphs.replays == 1
        plain = BrickChain(backend)
        torch.testing.assert_close(first, _sample(plain, [0, 1]), atol=0, rtol=0)
        torch.testing.assert_close(again, _sample(plain, [4, 5]), atol=0, rtol=0)


def test_the_tensorrt_vae_decoder_never_runs_on_the_legacy_default_stream(fake, tmp_path):
    """Defect 4, VAE decoding: the vae_decoder engine was enqueued on torch's current stream (the legacy default)."""
    from export.manifest import load_manifest
    from runtimes.backends.base import VAE_CALL

    cuda, trt = fake
    model = tiny_model("tiny_latent_PG_8")
    engine_dir = fake_tensorrt_dir(model, tmp_path / "engines", trt, decoder=True, side=(2, 8, 16))
    manifest = load_manifest(engine_dir)
    backend = TensorRTBackend(manifest, engine_dir, device=CPU, cuda=cuda)
    backend.decoder_entry = manifest.decoder_for("tensorrt")  # as runtimes.backends.decoding.attach_decoder does
    latents = torch.randn(3, 4, 8, 8)
    images = torch.zeros(3, 3, 64, 64)
    with backend, torch.no_grad():
        backend.infer(VAE_CALL, {"latents": latents}, {"images": images})
    torch.testing.assert_close(images, latents[:, :3].repeat_interleave(8, 2).repeat_interleave(8, 3))


def test_contexts_a_graph_captured_outlive_the_bounded_context_cache(fake, model, tmp_path):
    """With room for two contexts, capturing key B evicts key A's contexts from the cache; A's graph still
    replays on them (held with the graph), and new calls get contexts of their own."""
    from export.manifest import load_manifest

    cuda, trt = fake
    engine_dir = fake_tensorrt_dir(model, tmp_path / "engines", trt)
    backend = TensorRTBackend(load_manifest(engine_dir), engine_dir, device=CPU, cuda=cuda, max_contexts=2)
    x, sigma, labels = _inputs(2, 16, 16)
    with backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        with chain.batch(labels, batch=2, height=16, width=16) as denoise:
            for act in [(0, 1, 2), (1, 2), (0, 1, 2), (1, 2), (0,)]:
                denoise(x, sigma, act)
                got = denoise(x, sigma, act)  # replays
                torch.testing.assert_close(got, model(x, sigma, labels, act), atol=0, rtol=0)
        assert len(backend.contexts) == 2 and chain.graphs.captures == 3


def test_graphs_are_captured_again_after_the_backend_reloads(backend, model):
    x, sigma, labels = _inputs(1, 16, 16)
    chain = BrickChain(backend, cuda_graphs=True)
    with torch.no_grad():
        for _ in range(2):
            with backend, chain.batch(labels, batch=1, height=16, width=16) as denoise:
                for _ in range(2):
                    torch.testing.assert_close(denoise(x, sigma, (0, 1)), model(x, sigma, labels, (0, 1)))
    assert chain.graphs.captures == 2 and chain.graphs.replays == 2
