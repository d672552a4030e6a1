"""runtimes.Generator and the chain under a service's use: any request, shared backends, threads, grad modes, misuse."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import lego_model.eager
from export.errors import ProfileError
from lego_model import shipped_checkpoint
from lego_model.eager import sample_images
from lego_model.errors import LegoError, ShapeError, SkipPlanError
from lego_model.images import to_uint8_nhwc
from runtimes import Generator
from runtimes.backends import open_backend
from runtimes.backends.base import EngineCall
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain
from runtimes.errors import BackendError, UsageError
from tests.runtimes.conftest import tiny_model

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def eager(model, seeds, *, steps=3, **request):
    return sample_images(model, seeds, steps=steps, **request)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.cpu() - want).abs().max() / want.abs().max()).item()


# Two fp32 evaluations of the same model that differ only in the order of their sums (another batch size picks
# other GEMM blockings; ONNX Runtime's kernels are not torch's): each layer rounds differently by ~sqrt(K) * 2^-24
# relative (K <= 256 here), ~1e-6; over the ~10 layers of a tiny brick stack ~3e-6 per denoiser call.  Guidance
# (f_null + s (f_cond - f_null), s = 2) amplifies a difference by up to 1 + 2s = 5, and 3 Heun steps make 5 calls:
# <= 25 x 3e-6 ~ 8e-5 on the sampled images.  2e-4 leaves the factor of two that rounding on another CPU needs;
# bit-identical results are asserted where the arithmetic is the same (same batch, same backend).
REORDERED_FP32 = 2e-4


# --------------------------------------------------------------------------- one call per request


def test_generate_equals_eager_through_torch_and_onnxruntime(engines_pg):
    model = tiny_model("tiny_PG_16")
    request = dict(size=(16, 32), classes=[1, 5, 9], plan="2@0.5:1", cfg_scale=2.0, steps=3)
    want = eager(model, [4, 5, 6], **request)
    with Generator.from_checkpoint(model, device="cpu") as gen:
        got = gen.generate([4, 5, 6], **request)
        torch.testing.assert_close(got, want, atol=0, rtol=0)  # same batch, same engines: the same bits
        # Split into batches of 1: each image depends on its seed and class alone.
        assert rel_err(gen.generate([4, 5, 6], batch=1, **request), want) < REORDERED_FP32
    with Generator.from_engine_dir(engines_pg, "onnxruntime-cpu", threads=1) as gen:
        assert gen.backend.name == "onnxruntime-cpu"
        assert rel_err(gen.generate(range(4, 7), **request), want) < REORDERED_FP32
        # More seeds than the profile's batch (1..8, guidance doubles rows): split into 4 + 4 + 1.
        many = gen.generate(range(9), classes=2, steps=2, cfg_scale=1.5)
        assert many.shape == (9, 3, 16, 16)
        assert rel_err(many, eager(model, range(9), classes=2, steps=2, cfg_scale=1.5)) < REORDERED_FP32


def test_outputs_as_tensor_uint8_and_pil():
    with Generator.from_checkpoint(device="cpu") as gen:  # the shipped model: 1 channel, 16x16
        kw = dict(classes=7, steps=2)
        images = gen.generate([0, 1], **kw)
        arr = gen.generate([0, 1], output="uint8", **kw)
        pil = gen.generate([0, 1], output="pil", **kw)
        one = gen.generate(0, size=(16, 32), **kw)
    assert images.dtype == torch.float64 and images.shape == (2, 1, 16, 16)
    assert arr.dtype == np.uint8 and arr.shape == (2, 16, 16, 1)
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "L"
    np.testing.assert_array_equal(np.asarray(pil[1]), arr[1, :, :, 0])
    assert one.shape == (1, 1, 16, 32)
    assert Path(shipped_checkpoint()).is_file()


def test_generator_lifecycle_loads_lazily_and_refuses_after_close():
    gen = Generator.from_checkpoint(tiny_model("tiny_PG_16"), device="cpu")
    assert not gen.backend.loaded
    gen.generate([0], steps=1)  # the first request loads the backend
    assert gen.backend.loaded
    gen.close()
    assert not gen.backend.loaded
    with pytest.raises(UsageError, match="closed"):
        gen.generate([0], steps=1)


# --------------------------------------------------------------------------- shared backends, any request mix


def test_segfault_sequence_of_shared_onnxruntime_backend_runs_in_a_subprocess(engines_pg):
    """Issue 11: a new chain per request on one ONNX Runtime backend segfaulted (bindings cached by call)."""
    script = textwrap.dedent(
        f"""
        import torch
        from lego_model.sampler import draw_latents, edm_sample
        from runtimes.backends import open_backend
        from runtimes.chain import BrickChain
        from tests.runtimes.conftest import tiny_model

        torch.set_num_threads(1)
        model = tiny_model("tiny_PG_16")
        backend, _ = open_backend("onnxruntime-cpu", engine_dir={str(engines_pg)!r}, threads=1)

        def run(chain, seeds, cfg=None, eager=False):
            lat, lab, _ = draw_latents(seeds, 3, 16, 16, 10)
            if eager:
                den = lambda x, s, a: model(x, s, lab, a, cfg)
                return edm_sample(den, lat, num_steps=3, all_bricks=(0, 1, 2))
            with chain.batch(lab, batch=len(seeds), height=16, width=16, cfg_scale=cfg) as den:
                return edm_sample(den, lat, num_steps=3, all_bricks=(0, 1, 2))

        errs = []
        with backend:
            for _ in range(4):  # a new chain per request: the second used to crash
                errs.append((run(BrickChain(backend), [0, 1]) - run(None, [0, 1], eager=True)).abs().max())
            first, second = BrickChain(backend), BrickChain(backend)  # both alive
            run(first, [0, 1]); run(second, [2, 3])
            errs.append((run(first, [0, 1]) - run(None, [0, 1], eager=True)).abs().max())
            chain = BrickChain(backend)  # batch 4 unguided, then batch 2 guided: both 4 engine rows
            run(chain, [0, 1, 2, 3])
            errs.append((run(chain, [0, 1], 2.0) - run(None, [0, 1], 2.0, eager=True)).abs().max())
        print("max error", max(errs).item())
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, env=_env()
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    err = float(proc.stdout.split("max error")[1])
    assert err < 1e-4, proc.stdout


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_backend_rebinds_when_handed_other_buffers(engines_pg):
    """Bindings are keyed by the buffers: fresh tensors per call (a caller of its own) get fresh bindings."""
    model = tiny_model("tiny_PG_16")
    call = EngineCall("embedder", None, None, "cond")
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, threads=1)
    with backend, torch.no_grad():
        for rows, seed in ((2, 0), (2, 1), (3, 2), (2, 3)):
            g = torch.Generator().manual_seed(seed)
            c_noise, labels = torch.randn(rows, generator=g), torch.eye(10)[torch.arange(rows)]
            out = torch.empty(rows, 64)
            backend.infer(call, {"c_noise": c_noise, "class_labels": labels}, {"cond": out})
            torch.testing.assert_close(out, model.embed(c_noise, labels), atol=1e-5, rtol=1e-5)
        assert backend._bindings.misses == 4


def test_chain_buffer_sets_are_a_bounded_lru_that_can_be_cleared():
    model = tiny_model("tiny_PG_16")
    with Generator.from_checkpoint(model, device="cpu", max_buffer_sets=2) as gen:
        for size in ((16, 16), (16, 32), (32, 16), (16, 16)):
            gen.generate([0], size=size, steps=1)
            assert len(gen.chain) <= 2
        assert list(gen.chain._buffers) == [(1, 32, 16, False), (1, 16, 16, False)]  # least recent first
        gen.clear_buffers()
        assert len(gen.chain) == 0
        gen.generate([0], steps=1)
        assert len(gen.chain) == 1


@pytest.mark.parametrize("first", ["inference_mode", "no_grad", "grad"])
def test_grad_mode_of_the_caller_does_not_matter(first):
    model = tiny_model("tiny_PG_16")
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}
    want = eager(model, [0, 1], classes=3, steps=2)
    with Generator.from_checkpoint(model, device="cpu") as gen:
        order = [first, *(m for m in modes if m != first)]
        for mode in order:  # the first mode creates the buffers, the others reuse them
            with modes[mode]():
                got = gen.generate([0, 1], classes=3, steps=2)
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=mode)
            assert not got.requires_grad


def test_the_eager_model_returns_the_output_asked():
    model = tiny_model("tiny_PG_16")
    images = sample_images(model, [0, 1], steps=2)
    assert np.array_equal(sample_images(model, [0, 1], steps=2, output="uint8"), to_uint8_nhwc(images))
    pil = sample_images(model, [0, 1], steps=2, output="pil")
    assert [np.asarray(p).tolist() for p in pil] == to_uint8_nhwc(images).tolist()


def test_an_empty_remainder_samples_no_images(engines_pg):
    """A resume's remainder may hold no seed: every output of it is empty, from the generator and the eager model."""
    model = tiny_model("tiny_PG_16")
    with Generator.from_engine_dir(engines_pg, "onnxruntime-cpu", threads=1) as gen:
        none = gen.request([0, 1], steps=2, size=(16, 32)).only([])
        assert gen.generate(none).shape == (0, 3, 16, 32)
        assert gen.generate(none.only([])).dtype == torch.float64
        assert list(gen.batches(none)) == []
        assert gen.generate(gen.request([0], steps=2, output="uint8").only([])).shape == (0, 16, 16, 3)
        assert gen.generate(gen.request([0], steps=2, output="pil").only([])) == []
    assert lego_model.eager.sample(model, none).shape == (0, 3, 16, 32)


def test_the_torch_backend_runs_on_the_threads_asked():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with Generator.from_checkpoint(tiny_model("tiny_PG_16"), device="cpu", threads=1) as gen:
            gen.generate([0], steps=1)
            assert torch.get_num_threads() == 1  # torch's threads are the process's: set when the backend loads
    finally:
        torch.set_num_threads(before)


def test_the_callers_model_is_not_modified():
    model = tiny_model("tiny_PG_16").train().requires_grad_(True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with Generator.from_checkpoint(model, device="cpu") as gen:
        gen.generate([0], steps=1)
        assert gen.backend.model is not model  # a training-mode model is run from a copy
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    frozen = tiny_model("tiny_PG_16").requires_grad_(True)  # eval mode, on the CPU: run as it is
    with TorchBackend(frozen, device="cpu") as backend:
        assert backend.model is frozen
    assert all(p.requires_grad for p in frozen.parameters()) and not frozen.training


# --------------------------------------------------------------------------- threads


@pytest.mark.parametrize("kind", ["torch", "onnxruntime-cpu"])
def test_two_threads_on_one_generator_get_eager_images(engines_pg, kind):
    model = tiny_model("tiny_PG_16")
    requests = [
        [dict(seeds=[0, 1], classes=2, steps=3), dict(seeds=[5], size=(32, 16), cfg_scale=2.0, steps=2)],
        [dict(seeds=[2, 3, 4], plan="0@0:0.5", steps=3), dict(seeds=[6, 7], classes=[1, 8], cfg_scale=1.5, steps=2)],
    ]
    wants = [[eager(model, **r) for r in rs] for rs in requests]
    if kind == "torch":
        gen = Generator.from_checkpoint(model, device="cpu")
    else:
        gen = Generator.from_engine_dir(engines_pg, kind, threads=1)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            results[i] = [gen.generate(**r) for _ in range(2) for r in requests[i]]
        except BaseException as err:
            errors.append(err)

    with gen:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not errors, errors
    for i in range(2):
        for got, want in zip(results[i], wants[i] * 2):
            assert rel_err(got, want) < 1e-4


def test_a_batches_iterator_may_move_between_threads_and_blocks_no_one_while_suspended():
    """An executor advances a streaming iterator on whichever worker is free; a client may stop reading."""
    model = tiny_model("tiny_PG_16")
    with Generator.from_checkpoint(model, device="cpu") as gen:
        request = gen.request(range(3), classes=4, batch=1, steps=2)
        batches = gen.batches(request)
        seeds, first = next(batches)  # suspended here, on this thread, after its first batch
        other: list = []
        # daemon threads: a regression blocks them for good, and must not keep the test process alive
        t = threading.Thread(target=lambda: other.append(gen.generate([7], classes=1, steps=2)), daemon=True)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive(), "a suspended batches() iterator blocked another thread's request"
        # the rest advanced on two other threads, one batch each
        rest: list = []
        for _ in range(2):
            t = threading.Thread(target=lambda: rest.append(next(batches)), daemon=True)
            t.start()
            t.join(timeout=60)
        assert next(batches, None) is None
        got = torch.cat([first] + [x for _, x in rest])
        assert [seeds] + [s for s, _ in rest] == [(0,), (1,), (2,)]
        assert torch.equal(got, gen.generate(request))  # the other request in between changed nothing
        assert torch.equal(other[0], gen.generate([7], classes=1, steps=2))


def test_two_threads_on_one_chain_wait_for_each_other():
    """A chain runs one batch block at a time; a second thread's block starts when the first one's ends."""
    model = tiny_model("tiny_PG_16")
    with TorchBackend(model, device=CPU) as backend:
        chain = BrickChain(backend)
        inside = threading.Event()
        release = threading.Event()
        order = []

        def first() -> None:
            with chain.batch(None, batch=1, height=16, width=16):
                order.append("first in")
                inside.set()
                release.wait(10)
                order.append("first out")

        def second() -> None:
            inside.wait(10)
            with chain.batch(None, batch=1, height=16, width=16):
                order.append("second in")

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for t in threads:
            t.start()
        inside.wait(10)
        release.set()
        for t in threads:
            t.join(10)
    assert order == ["first in", "first out", "second in"]
    with TorchBackend(model, device=CPU) as backend:
        chain = BrickChain(backend)
        with chain.batch(None, batch=1, height=16, width=16):
            with pytest.raises(UsageError, match="do not nest"):
                with chain.batch(None, batch=1, height=16, width=16):
                    pass


# --------------------------------------------------------------------------- misuse


def _chain_misuse(case: str, backend) -> None:
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    sigma = torch.full((2,), 0.5, dtype=torch.float64)
    eye = torch.eye(10)
    chain = BrickChain(backend)
    if case == "latents batch":
        with chain.batch(eye[:2], batch=2, height=16, width=16) as denoise:
            denoise(x[:1], sigma[:1], (0, 1, 2))
    elif case == "class indices":
        with chain.batch(torch.tensor([3, 4]), batch=2, height=16, width=16):
            pass
    elif case == "label batch":
        with chain.batch(eye[:1], batch=2, height=16, width=16):
            pass
    elif case == "label width":
        with chain.batch(torch.zeros(2, 5), batch=2, height=16, width=16):
            pass
    elif case == "sigma [B, 1]":
        with chain.batch(eye[:2], batch=2, height=16, width=16) as denoise:
            denoise(x, sigma[:, None], (0, 1, 2))
    elif case == "channels":
        with chain.batch(eye[:2], batch=2, height=16, width=16) as denoise:
            denoise(x[:, :1], sigma, (0, 1, 2))
    elif case == "outside a batch":
        with chain.batch(eye[:2], batch=2, height=16, width=16) as denoise:
            pass
        denoise(x, sigma, (0, 1, 2))


CHAIN_MISUSE = {
    "latents batch": r"x: expected a float tensor of shape \(2, 3, 16, 16\)",
    "class indices": r"labels: got class indices of shape \(2,\); pass one-hot rows of shape \(2, 10\)",
    "label batch": r"labels: expected one-hot rows of shape \(2, 10\).*got shape \(1, 10\)",
    "label width": r"labels: expected one-hot rows of shape \(2, 10\).*got shape \(2, 5\)",
    "sigma [B, 1]": r"sigma: expected a tensor of shape \(2,\) .*got \(2, 1\)",
    "channels": r"x: expected a float tensor of shape \(2, 3, 16, 16\).*got \(2, 1, 16, 16\)",
    "outside a batch": r"finished chain.batch\(\) block",
}


@pytest.mark.parametrize("case", CHAIN_MISUSE)
@pytest.mark.parametrize("kind", ["torch", "onnxruntime-cpu"])
def test_chain_misuse_is_refused_before_any_engine_runs(engines_pg, case, kind):
    if kind == "torch":
        backend = TorchBackend(tiny_model("tiny_PG_16"), device=CPU)
    else:
        backend, _ = open_backend(kind, engine_dir=engines_pg, threads=1)
    calls = []
    with backend:
        infer = backend.infer
        backend.infer = lambda *a: (calls.append(a), infer(*a))
        with pytest.raises(UsageError, match=CHAIN_MISUSE[case]):
            _chain_misuse(case, backend)
    assert not calls, f"{case}: an engine ran before the refusal"


def test_backend_and_chain_outside_with_are_refused(engines_pg):
    backend, _ = open_backend("onnxruntime-cpu", engine_dir=engines_pg, threads=1)
    call = EngineCall("embedder", None, None, "cond")
    with pytest.raises(UsageError, match=r"not loaded: run engines inside `with backend:`"):
        backend.infer(
            call, {"c_noise": torch.zeros(1), "class_labels": torch.zeros(1, 10)}, {"cond": torch.zeros(1, 64)}
        )
    with pytest.raises(UsageError, match="not loaded"):
        with BrickChain(backend).batch(None, batch=1, height=16, width=16):
            pass
    torch_backend = TorchBackend(tiny_model("tiny_PG_16"), device=CPU)
    with pytest.raises(UsageError, match="not loaded"):
        with BrickChain(torch_backend).batch(None, batch=1, height=16, width=16):
            pass


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_device_on_a_cpu_machine_is_refused(engines_pg):
    model = tiny_model("tiny_PG_16")
    for make in (
        lambda: TorchBackend(model, device="cuda"),
        lambda: Generator.from_checkpoint(model, device="cuda:0"),
        lambda: Generator.from_engine_dir(engines_pg, "torch", device="cuda"),
    ):
        with pytest.raises(BackendError, match="needs a CUDA GPU and none is visible"):
            make()
    with pytest.raises(BackendError, match="device= does not apply to the onnxruntime-cpu backend"):
        Generator.from_engine_dir(engines_pg, "onnxruntime-cpu", device="cpu")


GENERATE_MISUSE = [
    (dict(seeds=[-1]), UsageError, r"seeds: expected ints in \[0, 2\*\*32\)"),
    (dict(seeds=[2**32]), UsageError, r"seeds: expected ints"),
    (dict(seeds=[]), UsageError, "at least one seed"),
    (dict(seeds=[0, 1], classes=[1]), UsageError, "classes: 1 given for 2 seeds"),
    (dict(seeds=[0], classes=10), ShapeError, r"class 10 out of range: .* classes 0..9"),
    (dict(seeds=[0], classes=[1.5]), UsageError, "classes: expected ints"),
    (dict(seeds=[0], size=(16, 20)), ShapeError, "multiples of 16"),
    (dict(seeds=[0], size=(16,)), UsageError, r"size: expected \(height, width\)"),
    (dict(seeds=[0], size=(80, 16)), ProfileError, r"height 80 not in \[16, 64\]"),  # the engines' profile
    (dict(seeds=[0], cfg_scale=float("nan")), LegoError, "guidance scale nan is outside 0..100"),
    (dict(seeds=[0], steps=0), UsageError, r"steps must be an int in 1\.\.1000"),
    (dict(seeds=[0], steps=10**7), UsageError, r"steps must be an int in 1\.\.1000"),
    (dict(seeds=[0], solver="dpm"), UsageError, "solver must be one of 'heun', 'euler', got 'dpm'"),
    (dict(seeds=[0], output="png"), UsageError, "output must be one of tensor, uint8, pil"),
    (dict(seeds=[0], plan="2@0.6"), SkipPlanError, "cannot parse skip rule"),
    (dict(seeds=[0], plan=["0,1,2@0:1"]), SkipPlanError, "leaves step 0"),
    (dict(seeds=[0], batch=0), UsageError, "batch must be an int in 1.."),
    (dict(seeds=list(range(9)), batch=9), ProfileError, r"batch 9 not in \[1, 8\]"),
    (dict(seeds=[0], S_churn=-1.0), LegoError, "S_churn -1.0 must be a finite number >= 0"),
    (dict(seeds=[0], S_churn=float("inf")), LegoError, "S_churn inf must be a finite number >= 0"),
    (dict(seeds=[0], S_min=2.0, S_max=1.0), LegoError, "must satisfy 0 <= S_min <= S_max"),
    (dict(seeds=[0], S_noise="1"), UsageError, "S_noise must be a number"),
]


@pytest.mark.parametrize("kwargs,error,message", GENERATE_MISUSE, ids=[str(m[0]) for m in GENERATE_MISUSE])
def test_generate_refuses_bad_requests_before_loading_anything(engines_pg, kwargs, error, message):
    gen = Generator.from_engine_dir(engines_pg, "onnxruntime-cpu", threads=1)
    with pytest.raises(error, match=message):
        gen.generate(**kwargs)
    assert not gen.backend.loaded  # refused before the sessions were even created


def test_guidance_and_classes_on_an_unconditional_model_are_refused(engines_pr):
    gen = Generator.from_engine_dir(engines_pr, "onnxruntime-cpu", threads=1)
    for kwargs in (dict(cfg_scale=2.0), dict(classes=1)):
        with pytest.raises(ShapeError, match="unconditional"):
            gen.generate([0], **kwargs)
    assert not gen.backend.loaded
