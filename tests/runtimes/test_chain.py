"""The brick chain against the eager model: every skip pattern, guidance, non-square sizes, NaN detection."""

from __future__ import annotations

import itertools

import pytest
import torch

from lego_model.errors import ShapeError
from runtimes.backends import open_backend
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain, binding_plan, step_of_call
from runtimes.errors import NonFiniteError, UsageError
from tests.runtimes.conftest import export_onnx_dir, tiny_model

CPU = torch.device("cpu")


def all_patterns(n: int) -> list[tuple[int, ...]]:
    return [act for r in range(1, n + 1) for act in itertools.combinations(range(n), r)]


def inputs(batch: int, height: int, width: int, label_dim: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64) * 2
    sigma = torch.tensor([0.02, 0.7, 5.0, 40.0][:batch], dtype=torch.float64)
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim] if label_dim else None
    return x, sigma, labels


def test_binding_plan_ping_pongs_and_leaves_out_skipped_bricks():
    plan = binding_plan((0, 2, 4), 5)
    assert [c.engine for c in plan] == ["embedder", "brick0", "brick2", "brick4"]
    assert [(c.src, c.dst) for c in plan[1:]] == [(None, "f0"), ("f0", "f1"), ("f1", "f0")]
    # Brick 0 skipped: the first brick reads f = 0.
    plan = binding_plan((3, 1), 5)
    assert [(c.engine, c.src, c.dst) for c in plan[1:]] == [("brick1", "zeros", "f0"), ("brick3", "f0", "f1")]
    for act in all_patterns(5):
        for call in binding_plan(act, 5)[1:]:
            assert call.src != call.dst
    with pytest.raises(ShapeError, match="at least one brick"):
        binding_plan((), 3)


def test_step_of_call_follows_heun_and_euler_evaluations():
    # Heun, 3 steps: calls 1-2 step 0, 3-4 step 1, 5 step 2 (no correction at the last step).
    assert [step_of_call(c, 3, "heun") for c in range(1, 6)] == [0, 0, 1, 1, 2]
    assert [step_of_call(c, 3, "euler") for c in range(1, 4)] == [0, 1, 2]


@pytest.mark.parametrize("cfg_scale", [None, 2.5])
def test_torch_backend_chain_equals_eager_for_every_skip_pattern(cfg_scale):
    model = tiny_model("tiny_U_16")
    x, sigma, labels = inputs(2, 16, 32, 10)
    with TorchBackend(model, device=CPU) as backend, torch.no_grad():
        with BrickChain(backend).batch(labels, batch=2, height=16, width=32, cfg_scale=cfg_scale) as denoise:
            for act in all_patterns(5):
                got = denoise(x, sigma, act)
                want = model(x, sigma, labels, act, cfg_scale)
                torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"active {act}")


@pytest.mark.parametrize("cfg_scale", [None, 1.5])
def test_onnxruntime_chain_equals_eager_for_every_skip_pattern(engines_pg, cfg_scale):
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(2, 32, 16, 10)
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, threads=1)
    with backend, torch.no_grad():
        with BrickChain(backend).batch(labels, batch=2, height=32, width=16, cfg_scale=cfg_scale) as denoise:
            for act in all_patterns(3):
                got = denoise(x, sigma, act)
                want = model(x, sigma, labels, act, cfg_scale)
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, msg=f"active {act}")


def test_unconditional_engines_match_eager(engines_pr):
    model = tiny_model("tiny_PR_16")
    x, sigma, _ = inputs(3, 16, 16, 0)
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pr, threads=1)
    with backend, torch.no_grad():
        chain = BrickChain(backend)
        with chain.batch(None, batch=3, height=16, width=16) as denoise:
            for act in all_patterns(3):
                torch.testing.assert_close(denoise(x, sigma, act), model(x, sigma, None, act), atol=2e-5, rtol=1e-5)
        with pytest.raises(ShapeError, match="guidance .* needs a class-conditional model"):
            chain.check(3, 16, 16, cfg_scale=2.0)


def test_buffers_are_reused_across_calls_and_shapes():
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(2, 16, 16, 10)
    with TorchBackend(model, device=CPU) as backend, torch.no_grad():
        chain = BrickChain(backend)
        with chain.batch(labels, batch=2, height=16, width=16) as denoise:
            ptr = denoise(x, sigma, (0, 1, 2)).data_ptr()
            assert denoise(x, sigma, (1,)).data_ptr() == ptr  # the output buffer, reused
        with chain.batch(labels[:1], batch=1, height=32, width=16) as denoise:
            denoise(x[:1, :, :, :].repeat(1, 1, 2, 1), sigma[:1], (0, 2))
        with chain.batch(labels, batch=2, height=16, width=16) as denoise:
            assert denoise(x, sigma, (0, 1, 2)).data_ptr() == ptr  # back to the first shape: same buffers
        assert len(chain._buffers) == 2


@pytest.mark.parametrize("brick", [0, 2])
def test_nonfinite_output_names_brick_and_step(brick):
    from lego_model.sampler import edm_sample

    model = tiny_model("tiny_PG_16")
    x, _, labels = inputs(2, 16, 16, 10)
    with torch.no_grad():
        model.bricks[brick].final_layer.linear.bias.fill_(float("inf"))
    with TorchBackend(model, device=CPU) as backend, torch.no_grad():
        chain = BrickChain(backend)
        steps = [(0, 1), (0, 1), (0, 1, 2), (0, 1, 2)]  # brick 2 first runs at step 2
        with pytest.raises(
            NonFiniteError,
            match=rf"brick {brick} \(torch, fp32\) produced NaN/Inf at sampling step {0 if brick == 0 else 2} of 4",
        ):
            with chain.batch(labels, batch=2, height=16, width=16, num_steps=4, solver="heun") as denoise:
                edm_sample(denoise, x, num_steps=4, active_per_step=steps)


def test_cpu_reads_one_output_per_call_and_reruns_a_bad_call_to_name_the_engine(monkeypatch):
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(1, 16, 16, 10)
    with TorchBackend(model, device=CPU) as backend, torch.no_grad():
        chain = BrickChain(backend)
        recorded = []
        record = chain._watch.record
        monkeypatch.setattr(chain._watch, "record", lambda slot, out: (recorded.append(slot), record(slot, out)))
        with chain.batch(labels, batch=1, height=16, width=16) as denoise:
            denoise(x, sigma, (0, 1, 2))
        assert recorded == [3]  # the last engine's output only: a NaN/Inf anywhere reaches it
        recorded.clear()
        with torch.no_grad():
            model.bricks[0].final_layer.linear.bias.fill_(float("nan"))
        with pytest.raises(NonFiniteError, match=r"brick 0 \(torch, fp32\) produced NaN/Inf at denoiser call 1"):
            with chain.batch(labels, batch=1, height=16, width=16) as denoise:
                denoise(x, sigma, (0, 1, 2))
        assert recorded == [3, 0, 1, 2, 3]  # the bad call, then its rerun engine by engine
        chain.check_each_call = False  # as on CUDA: every engine has its own record, read when the block ends
        recorded.clear()
        with pytest.raises(NonFiniteError, match=r"brick 0 \(torch, fp32\)"):
            with chain.batch(labels, batch=1, height=16, width=16) as denoise:
                denoise(x, sigma, (0, 1, 2))
        assert recorded == [0, 1, 2, 3]


def test_nonfinite_embedder_is_named():
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(1, 16, 16, 10)
    with torch.no_grad():
        model.model.t_embedder.mlp[2].bias.fill_(float("nan"))
    with TorchBackend(model, device=CPU) as backend, torch.no_grad():
        chain = BrickChain(backend)
        with pytest.raises(
            NonFiniteError, match=r"the embedder \(torch, fp32\) produced NaN/Inf at denoiser call 1: its weight"
        ):
            with chain.batch(labels, batch=1, height=16, width=16) as denoise:
                denoise(x, sigma, (0,))


def test_nonfinite_detection_through_onnxruntime(tmp_path):
    model = tiny_model("tiny_PR_16")
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(float("nan"))
    engine_dir = export_onnx_dir(model, tmp_path / "nan")
    x, sigma, _ = inputs(1, 16, 16, 0)
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engine_dir, threads=1)
    with backend, torch.no_grad():
        chain = BrickChain(backend)
        with pytest.raises(
            NonFiniteError,
            match=r"brick 1 \(onnxruntime-cpu, fp32\) produced NaN/Inf at sampling step 1 of 3: its weight .* holds",
        ):
            with chain.batch(None, batch=1, height=16, width=16, num_steps=3, solver="euler") as denoise:
                denoise(x, sigma, (0,))
                denoise(x, sigma, (0, 1, 2))


def test_onnxruntime_transformer_fusions_keep_parity(engines_pg):
    from export.manifest import load_manifest
    from runtimes.backends.ort import OnnxRuntimeBackend

    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(2, 16, 16, 10)
    backend = OnnxRuntimeBackend(load_manifest(engines_pg), engines_pg, device=CPU, threads=1, optimization="fusions")
    with backend, torch.no_grad():
        with BrickChain(backend).batch(labels, batch=2, height=16, width=16) as denoise:
            for act in [(0, 1, 2), (1, 2)]:
                torch.testing.assert_close(denoise(x, sigma, act), model(x, sigma, labels, act), atol=2e-5, rtol=1e-5)


def test_cuda_graphs_are_off_without_cuda_or_for_backends_that_cannot_be_captured(engines_pg):
    with TorchBackend(tiny_model("tiny_PG_16"), device=CPU) as backend:
        assert BrickChain(backend, cuda_graphs=True).graphs is None
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, threads=1)
    assert not backend.supports_cuda_graphs
    assert BrickChain(backend, cuda_graphs=True).graphs is None


def test_batch_block_checks_nonfinite_even_when_sampling_raises():
    model = tiny_model("tiny_PG_16")
    x, sigma, labels = inputs(1, 16, 16, 10)
    with torch.no_grad():
        model.bricks[1].final_layer.linear.bias.fill_(float("nan"))
    with TorchBackend(model, device=CPU) as backend:
        chain = BrickChain(backend)
        chain.check_each_call = False  # as on CUDA: no read per call, only the one at the block's end
        with pytest.raises(NonFiniteError, match=r"brick 1 \(torch, fp32\) produced NaN/Inf at denoiser call 1"):
            with chain.batch(labels, batch=1, height=16, width=16) as denoise:
                denoise(x, sigma, (0, 1))
        # An error inside the block stays the error raised; the NaN/Inf found afterwards is a note on it.
        with pytest.raises(KeyError) as raised:
            with chain.batch(labels, batch=1, height=16, width=16) as denoise:
                denoise(x, sigma, (0, 1))
                raise KeyError("interrupted")
        assert any("brick 1 (torch, fp32) produced NaN/Inf" in note for note in raised.value.__notes__)
        with pytest.raises(UsageError, match="finished"):
            denoise(x, sigma, (0,))


def test_chain_builds_no_autograd_graph_in_grad_mode():
    model = tiny_model("tiny_PG_16").requires_grad_(True)
    x, sigma, labels = inputs(1, 16, 16, 10)
    assert torch.is_grad_enabled()
    with TorchBackend(model, device=CPU) as backend:
        with BrickChain(backend).batch(labels, batch=1, height=16, width=16) as denoise:
            out = denoise(x.requires_grad_(True), sigma, (0, 1, 2))
    assert not out.requires_grad and out.grad_fn is None
