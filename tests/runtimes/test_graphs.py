"""CUDA graph bookkeeping on the fake GPU (tests/fakes/cuda.py): keys, interleaved use, threads, the memory pool.

The torch backend on a :class:`FakeCuda` captures and replays for real: a replay reruns the recorded ops on the
buffers' current contents with the Python values of the capture baked in, so a graph that depends on anything
outside its key gives wrong numbers here, as it would on a GPU.
"""

from __future__ import annotations

import threading

import pytest
import torch

from lego_model.sampler import draw_latents, edm_sample
from lego_model.skip import SkipPlan
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from runtimes.errors import BackendError
from runtimes.graphs import GraphKey, LoopKey
from tests.fakes.cuda import FakeCuda
from tests.runtimes.conftest import tiny_model

CPU = torch.device("cpu")


def _inputs(batch: int, height: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64) * 2
    sigma = torch.tensor([0.02, 0.7, 5.0, 40.0][:batch], dtype=torch.float64)
    return x, sigma, torch.eye(10)[torch.arange(batch) % 10]


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny_PG_16")


def test_interleaved_keys_shapes_and_chains_replay_what_they_captured(model):
    """Several chains on one backend, shapes, guidance and active sets in turn: every call equals eager exactly."""
    cuda = FakeCuda()
    with TorchBackend(model, device=CPU, cuda=cuda) as backend, torch.no_grad():
        chains = [BrickChain(backend, cuda_graphs=True), BrickChain(backend, cuda_graphs=True)]
        for round_ in range(2):
            for chain in chains:
                for batch, h, w, scale in [(2, 16, 16, None), (1, 16, 32, 2.0), (2, 16, 16, 1.5)]:
                    x, sigma, labels = _inputs(batch, h, w, seed=round_)
                    with chain.batch(labels, batch=batch, height=h, width=w, cfg_scale=scale) as denoise:
                        for act in [(0, 1, 2), (1, 2), (0,), (1, 2), (0, 2)]:
                            got = denoise(x, sigma, act)
                            torch.testing.assert_close(got, model(x, sigma, labels, act, scale), atol=0, rtol=0)
        graphs = chains[0].graphs
        assert graphs.replays > 0 and graphs.captures == len(graphs)


def test_a_new_guidance_scale_replays_the_captured_graph(model):
    x, sigma, labels = _inputs(2, 16, 16)
    with TorchBackend(model, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        for scale in (1.5, 3.0, 0.3):
            with chain.batch(labels, batch=2, height=16, width=16, cfg_scale=scale) as denoise:
                denoise(x, sigma, (0, 2))  # the first call of a key runs eagerly, the second replays
                got = denoise(x, sigma, (0, 2))
                torch.testing.assert_close(got, model(x, sigma, labels, (0, 2), scale), atol=0, rtol=0)
        assert chain.graphs.captures == 1


class GatedBackend(TorchBackend):
    """Holds its first engine call inside a capture until ``release`` (or a second), so that another thread's
    capture would overlap it if nothing serialised captures."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_capture, self.release = threading.Event(), threading.Event()

    def infer(self, call, inputs, outputs) -> None:
        if self.cuda.capturing() and not self.in_capture.is_set():
            self.in_capture.set()
            self.release.wait(1.0)  # no timing is asserted: a serialised second thread just waits this long
        super().infer(call, inputs, outputs)


def _sample(chain, seeds, steps=3, height=16, width=16):
    cfg = chain.config
    latents, labels, _ = draw_latents(seeds, cfg.img_channels, height, width, cfg.label_dim)
    with chain.batch(labels, batch=len(seeds), height=height, width=width, num_steps=steps) as denoise:
        return edm_sample(denoise, latents, num_steps=steps, all_bricks=tuple(range(cfg.num_bricks)))


def test_captures_from_two_threads_are_serialised(model):
    """Defect 2: one generator per thread over a shared backend; PyTorch allows one capture at a time."""
    cuda = FakeCuda()
    results, errors = {}, []
    with GatedBackend(model, device=CPU, cuda=cuda) as backend, torch.no_grad():

        def worker(name, seeds):
            try:
                results[name] = _sample(BrickChain(backend, cuda_graphs=True), seeds)
            except Exception as err:
                errors.append(err)
            finally:
                backend.release.set()

        first = threading.Thread(target=worker, args=("first", [0]))
        first.start()
        backend.in_capture.wait(30)
        second = threading.Thread(target=worker, args=("second", [1]))
        second.start()
        first.join()
        second.join()
    assert not errors, errors
    with torch.no_grad():
        for name, seeds in (("first", [0]), ("second", [1])):
            with TorchBackend(model, device=CPU) as plain:
                torch.testing.assert_close(results[name], _sample(BrickChain(plain), seeds), atol=0, rtol=0)


class LeakyBackend(TorchBackend):
    """Keeps a tensor it made during the call: inside a capture, pool memory that stays alive after it."""

    def infer(self, call, inputs, outputs) -> None:
        super().infer(call, inputs, outputs)
        self.last = next(iter(outputs.values())) * 1.0


def test_a_capture_that_leaves_pool_memory_alive_is_refused(model):
    """Defect 5: graphs share one pool; memory a capture allocated and kept may be handed to the next capture."""
    x, sigma, labels = _inputs(1, 16, 16)
    with LeakyBackend(model, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        with pytest.raises(BackendError, match="still alive"):
            with chain.batch(labels, batch=1, height=16, width=16) as denoise:
                denoise(x, sigma, (0, 1, 2))
        assert len(chain.graphs) == 0  # nothing kept of the refused capture


# --------------------------------------------------------------------------- the whole sampling loop as one graph
CHURN = {"S_churn": 30.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003}


def _run(chain, seeds, *, steps=4, plan=None, cfg_scale=None, solver="heun", churn=None, size=(16, 16), on_step=None):
    """chain.sample for these seeds (per-seed latents, labels and churn noise, as the Generator draws them)."""
    cfg = chain.config
    latents, labels, rnd = draw_latents(seeds, cfg.img_channels, *size, cfg.label_dim)
    active = SkipPlan.of(plan, cfg).steps(steps)
    kw = dict(batch=len(seeds), height=size[0], width=size[1], cfg_scale=cfg_scale, num_steps=steps, solver=solver)
    with chain.batch(labels, **kw):
        return chain.sample(
            latents, num_steps=steps, solver=solver, randn_like=rnd.randn_like, active_per_step=active,
            on_step=on_step, **(churn or {}),
        )  # fmt: skip


def _eager(model, seeds, **kw):
    with TorchBackend(model, device=CPU) as plain:
        return _run(BrickChain(plain), seeds, **kw)


WHOLE_RUNS = [
    dict(solver="heun", churn=CHURN, cfg_scale=2.0, plan="2@0.5:1"),
    dict(solver="euler", churn=CHURN, cfg_scale=None, plan="0@0:0.5"),
    dict(solver="heun", churn=None, cfg_scale=1.5, plan=None, size=(16, 32)),
]


@pytest.mark.parametrize("kw", WHOLE_RUNS, ids=["heun-churn-guided-skip", "euler-churn-local-skip", "heun-wide"])
def test_a_whole_run_is_one_graph_and_replays_for_new_seeds(model, kw):
    """One capture per run key; a later batch with other seeds (latents, labels, churn noise) and another
    guidance scale replays it and still equals the uncaptured run exactly."""
    with TorchBackend(model, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        first = _run(chain, [0, 1], **kw)
        assert chain.graphs.captures == 1 and all(isinstance(k, LoopKey) for k in chain.graphs._graphs)
        torch.testing.assert_close(first, _eager(model, [0, 1], **kw), atol=0, rtol=0)
        other = dict(kw, cfg_scale=None if kw["cfg_scale"] is None else 3.0)
        again = _run(chain, [5, 9], **other)
        assert chain.graphs.captures == 1 and chain.graphs.replays == 1
        torch.testing.assert_close(again, _eager(model, [5, 9], **other), atol=0, rtol=0)


def test_whole_run_keys_interleave_across_plans_steps_and_chains(model):
    with TorchBackend(model, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        chains = [BrickChain(backend, cuda_graphs=True) for _ in range(2)]
        runs = [dict(plan="2@0.5:1", steps=3), dict(plan=None, steps=3), dict(plan="2@0.5:1", steps=2)]
        for round_ in range(2):
            for chain in chains:
                for kw in runs:
                    got = _run(chain, [round_, 7], cfg_scale=2.0, **kw)
                    torch.testing.assert_close(got, _eager(model, [round_, 7], cfg_scale=2.0, **kw), atol=0, rtol=0)
        assert [c.graphs.captures for c in chains] == [3, 3]  # one capture per run key and chain, then replays


def test_whole_run_falls_back_to_per_call_graphs_when_memory_is_short(model):
    """A run whose buffers (20 churned steps of noise) need more than half the free memory, which the
    activations of one call still fit in, samples through per-call graphs."""
    churn = dict(CHURN, S_min=0.0, S_max=float("inf"))
    with TorchBackend(model, device=CPU, cuda=FakeCuda(memory=110 << 10)) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        got = _run(chain, [3], steps=20, churn=churn)
        assert chain.graphs.captures >= 1 and all(isinstance(k, GraphKey) for k in chain.graphs._graphs)
    torch.testing.assert_close(got, _eager(model, [3], steps=20, churn=churn), atol=0, rtol=0)


def test_on_step_under_a_whole_run_graph_reports_every_step_after_the_run(model):
    seen = []
    with TorchBackend(model, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        _run(chain, [0], steps=3, on_step=seen.append)
        _run(chain, [1], steps=3, on_step=seen.append)  # replayed
    assert seen == [0, 1, 2, 0, 1, 2]


def test_graphs_captured_before_a_reload_are_captured_again(model):
    cuda = FakeCuda()
    backend = TorchBackend(model, device=CPU, cuda=cuda)
    chain = BrickChain(backend, cuda_graphs=True)
    with torch.no_grad():
        with backend:
            _run(chain, [0])
        with backend:  # loaded again: engines (here, the model copy) are new
            got = _run(chain, [1])
    assert chain.graphs.captures == 2
    torch.testing.assert_close(got, _eager(model, [1]), atol=0, rtol=0)


def test_nonfinite_inside_a_whole_run_graph_names_engine_and_step():
    from runtimes.errors import NonFiniteError

    bad = tiny_model("tiny_PG_16")
    with torch.no_grad():
        bad.bricks[2].final_layer.linear.bias.fill_(float("inf"))
    with TorchBackend(bad, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        chain = BrickChain(backend, cuda_graphs=True)
        for seeds in ([0], [1]):  # the capturing run, then a replay
            with pytest.raises(NonFiniteError, match=r"brick 2 \(torch, fp32\) produced NaN/Inf at sampling step 2"):
                _run(chain, seeds, steps=4, plan="2@0:0.5")


def test_sample_is_refused_outside_its_block_and_for_wrong_latents(model):
    from runtimes.errors import UsageError

    with TorchBackend(model, device=CPU) as backend:
        chain = BrickChain(backend)
        with pytest.raises(UsageError, match="inside a chain.batch"):
            chain.sample(torch.zeros(1, 3, 16, 16))
        with chain.batch(None, batch=1, height=16, width=16), pytest.raises(UsageError, match="latents: expected"):
            chain.sample(torch.zeros(2, 3, 16, 16))


def test_sample_without_graphs_is_edm_sample_over_the_block(model):
    """On the CPU chain.sample is the sampler over the block's denoiser: the same bits."""
    latents, labels, rnd = draw_latents([4], 3, 16, 16, 10)
    _, _, rnd2 = draw_latents([4], 3, 16, 16, 10)
    with TorchBackend(model, device=CPU) as backend, torch.no_grad():
        chain = BrickChain(backend)
        with chain.batch(labels, batch=1, height=16, width=16) as denoise:
            a = chain.sample(latents, num_steps=3, randn_like=rnd.randn_like, **CHURN)
            b = edm_sample(denoise, latents, num_steps=3, randn_like=rnd2.randn_like, all_bricks=(0, 1, 2), **CHURN)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_the_generator_samples_each_batch_as_one_whole_run_graph(model):
    """On a GPU the Generator (and so the sample CLI) replays one graph per batch; images equal the eager model's."""
    from lego_model.eager import sample_images
    from runtimes.generator import Generator

    request = dict(classes=[1, 5, 9, 2], size=(16, 16), plan="2@0.5:1", cfg_scale=2.0, steps=3, batch=2, S_churn=5.0)
    with TorchBackend(model, device=CPU, cuda=FakeCuda()) as backend, torch.no_grad():
        gen = Generator(backend, cuda_graphs=True)
        got = gen.generate([4, 5, 6, 7], **request)
        graphs = gen.chain.graphs
        assert graphs.captures == 1 and graphs.replays == 1  # two batches of one key: captured, then replayed
        assert all(isinstance(k, LoopKey) for k in graphs._graphs)
    torch.testing.assert_close(got, sample_images(model, [4, 5, 6, 7], **request), atol=0, rtol=0)
