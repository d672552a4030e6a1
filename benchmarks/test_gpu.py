"""The runtime on a CUDA GPU: the figures of one ``bash benchmarks/gpu.sh`` run (skipped without CUDA).

lego_S_PG_64 with random weights (seed 0) at 64x64 through the torch backend unless said otherwise; every
ratio is between figures of this one run.  fp32 rows run with TF32 off (matmuls and cuDNN convolutions;
benchmarks/conftest.py), so that fp32 parity means fp32 rounding (TF32 keeps 10 mantissa bits: the patch
embedding alone moves a brick's output by ~2e-4 relative).  Tables, in the order the tests run:

* ``gpu calls``: ms per denoiser call at batch 1 -- eager fp32, the torch backend without graphs, with
  per-call graphs, bf16 with per-call graphs; graphs against no graphs (max abs of one call).
* ``gpu runs``: an 18-step Heun run (35 calls) at batch 1 and 64 -- per-call graphs against the whole-loop
  graph, ms per run, images/s, their ratio, the whole-loop images against eager ones, peak memory.
* ``gpu flops``: achieved TFLOP/s of whole-loop runs at batch 64 (fp32 and bf16) against the bf16 and fp32
  matmul peaks measured here.
* ``gpu memory``: allocation growth over 100 whole-loop replays at batch 1.
* ``gpu bf16 quality``: the shipped model, bf16 against fp32 images (whole-loop), pixel differences in
  uint8 levels and the digit classifier's accuracy on both.
* ``gpu profile``: the kernels of one whole-loop replay at batch 1 and at batch 64 (traces written beside
  the results as profile_b1.json.gz, profile_b64.json.gz), and where the device time goes.

A breach of the parity bounds fails the test after its rows are recorded.

``LEGO_BENCH_FAKE_GPU=1`` on a machine without CUDA runs the same code on the fake GPU of the tests
(tests/fakes/cuda.py) with a tiny model, small batches and few steps: a check of the script itself before
it spends GPU time, whose figures mean nothing (memory statistics are NaN there).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import time

import pytest
import torch

from benchmarks.harness import artifact_dir, matmul_peak_gflops, max_abs, time_ms
from lego_model import LegoModel, SkipPlan, draw_latents, edm_sample, get_config
from lego_model.flops import sampling_flops
from runtimes.cuda import TORCH_CUDA

pytestmark = [pytest.mark.benchmark, pytest.mark.gpu]

FAKE = os.environ.get("LEGO_BENCH_FAKE_GPU") == "1" and not torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() or FAKE), reason="needs a CUDA GPU (run benchmarks/gpu.sh there)"
)
if FAKE:
    from tests.fakes.cuda import FakeCuda

    CUDA, DEVICE = FakeCuda(), torch.device("cpu")
    MODEL, SIZE, STEPS, BIG, PER_CLASS, PEAK_SIZES = "tiny_PG_16", 16, 3, 4, 1, (256,)
else:
    CUDA, DEVICE = TORCH_CUDA, torch.device("cuda", 0)
    MODEL, SIZE, STEPS, BIG, PER_CLASS, PEAK_SIZES = "lego_S_PG_64", 64, 18, 64, 20, (4096, 8192)
# fp32 with TF32 off, same kernels with and without graphs: a replay repeats its capture's arithmetic, so one
# call differs by nothing and a run of 35 calls by fp32 rounding through the ODE (|x| <= 80: 1e-4).
GRAPHS_VS_NONE_CALL = 1e-5
WHOLE_LOOP_VS_EAGER_RUN = 1e-3  # eager runs the model's own forward (other fusions), 35 calls in float32


@pytest.fixture(scope="module")
def model():
    if not (torch.cuda.is_available() or FAKE):
        pytest.skip("needs a CUDA GPU (run benchmarks/gpu.sh there)")
    return LegoModel(get_config(MODEL)).randomize_(0).eval().to(DEVICE)


def _backend(model, precision="fp32"):
    from runtimes.backends.torch_backend import TorchBackend

    return TorchBackend(model, device=DEVICE, precision=precision, cuda=None if not FAKE else CUDA)


def _sync() -> None:
    if not FAKE:
        torch.cuda.synchronize()


def _reset_peak() -> None:
    if not FAKE:
        torch.cuda.reset_peak_memory_stats()


def _peak_mib() -> float:
    return math.nan if FAKE else torch.cuda.max_memory_allocated() / 2**20


def _allocated() -> float:
    return math.nan if FAKE else torch.cuda.memory_allocated()


def _inputs(cfg, batch: int):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, cfg.img_channels, SIZE, SIZE, generator=g, dtype=torch.float64) * 2.5).to(DEVICE)
    sigma = torch.full((batch,), 2.5, dtype=torch.float64, device=DEVICE)
    labels = torch.eye(cfg.label_dim)[torch.arange(batch) % cfg.label_dim].to(DEVICE)
    return x, sigma, labels


@needs_cuda
def test_gpu_calls(model, report):
    """Batch 1: eager fp32, no graphs, per-call graphs, bf16 with per-call graphs."""
    from runtimes.chain import BrickChain

    cfg = model.config
    full = tuple(range(cfg.num_bricks))
    x, sigma, labels = _inputs(cfg, 1)
    shape = dict(batch=1, height=SIZE, width=SIZE)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        fp32 = stack.enter_context(_backend(model))
        bf16 = stack.enter_context(_backend(model, "bf16"))
        plain = stack.enter_context(BrickChain(fp32).batch(labels, **shape))
        graphed = stack.enter_context(BrickChain(fp32, cuda_graphs=True).batch(labels, **shape))
        graphed_bf16 = stack.enter_context(BrickChain(bf16, cuda_graphs=True).batch(labels, **shape))
        calls = {
            "eager fp32": lambda: model(x, sigma, labels, full),
            "torch backend, no graphs": lambda: plain(x, sigma, full),
            "torch backend, per-call graphs": lambda: graphed(x, sigma, full),
            "torch backend bf16, per-call graphs": lambda: graphed_bf16(x, sigma, full),
        }
        ms = {name: time_ms(fn, warmup=3, repeats=50)["median_ms"] for name, fn in calls.items()}
        d_plain = plain(x, sigma, full).clone()
        d_graph = graphed(x, sigma, full).clone()
    err = max_abs(d_graph, d_plain)
    for name, t in ms.items():
        report.add(
            "gpu calls", model=MODEL, size=f"{SIZE}x{SIZE}", batch=1, variant=name, ms_per_call=t,
            speedup_vs_eager_fp32=ms["eager fp32"] / t, graphs_vs_no_graphs_max_abs=err,
        )  # fmt: skip
    assert err <= GRAPHS_VS_NONE_CALL, f"per-call graphs vs no graphs: max abs {err:.2e}"


def _run(chain, seeds, *, whole: bool, steps=STEPS, plan=None):
    """One sampling run of these seeds through ``chain``: the whole-loop graph, or edm_sample over per-call graphs."""
    cfg = chain.config
    latents, labels, _ = draw_latents(seeds, cfg.img_channels, SIZE, SIZE, cfg.label_dim)
    latents, labels = latents.to(DEVICE), labels.to(DEVICE)
    active = SkipPlan.of(plan, cfg).steps(steps)
    with chain.batch(labels, batch=len(seeds), height=SIZE, width=SIZE, num_steps=steps) as denoise:
        if whole:
            return chain.sample(latents, num_steps=steps, active_per_step=active)
        return edm_sample(denoise, latents, num_steps=steps, active_per_step=active)


def _timed_runs(fn, repeats: int) -> tuple[torch.Tensor, float]:
    """(result of the first run, median ms of ``repeats`` later runs): the first run captures."""
    first = fn()
    _sync()
    out = {}
    stats = time_ms(lambda: out.__setitem__("r", fn()), warmup=0, repeats=repeats)
    return first, stats["median_ms"]


@needs_cuda
@pytest.mark.parametrize("batch", [1, BIG])
def test_gpu_runs(model, report, batch):
    """An 18-step Heun run: per-call graphs against the whole-loop graph, and whole-loop images against eager."""
    from runtimes.chain import BrickChain

    cfg = model.config
    seeds = list(range(batch))
    repeats = 5 if batch == 1 else 3
    rows, failures = {}, []
    with _backend(model) as be, torch.inference_mode():
        for variant, whole in (("per-call graphs", False), ("whole-loop graph", True)):
            _reset_peak()
            chain = BrickChain(be, cuda_graphs=True)
            images, ms = _timed_runs(lambda chain=chain, whole=whole: _run(chain, seeds, whole=whole), repeats)
            rows[variant] = (images, ms, _peak_mib(), len(chain.graphs))
        eager_images = _run(BrickChain(be), seeds, whole=False)  # no graphs: the chain's eager path
        latents, labels, _ = draw_latents(seeds, cfg.img_channels, SIZE, SIZE, cfg.label_dim)
        labels = labels.to(DEVICE)
        reference = edm_sample(  # the model's own forward, eagerly
            lambda x, s, a: model(x, s, labels, a), latents.to(DEVICE), num_steps=STEPS, all_bricks=(0, 1, 2)
        )
    whole_vs_eager = max_abs(rows["whole-loop graph"][0], reference)
    per_call_vs_none = max_abs(rows["per-call graphs"][0], eager_images)
    per_call_ms = rows["per-call graphs"][1]
    for variant, (_, ms, peak, graphs) in rows.items():
        report.add(
            "gpu runs", model=MODEL, size=f"{SIZE}x{SIZE}", batch=batch, steps=STEPS, solver="heun", variant=variant,
            ms_per_run=ms, images_per_s=batch / (ms * 1e-3), speedup_vs_per_call_graphs=per_call_ms / ms,
            graphs=graphs, peak_cuda_mib=peak, whole_loop_vs_eager_max_abs=whole_vs_eager,
            per_call_graphs_vs_no_graphs_max_abs=per_call_vs_none,
        )  # fmt: skip
    if whole_vs_eager > WHOLE_LOOP_VS_EAGER_RUN:
        failures.append(f"whole-loop vs eager images: max abs {whole_vs_eager:.2e}")
    assert not failures, "; ".join(failures)


@needs_cuda
def test_gpu_flops(model, report):
    """Achieved FLOP/s of whole-loop runs at batch 64 against the matmul peaks measured in this run."""
    from runtimes.chain import BrickChain

    cfg = model.config
    flops = BIG * sampling_flops(cfg, SIZE, SIZE, SkipPlan(cfg.num_bricks).steps(STEPS), "heun")
    # A GPU of this class reaches its matmul peak only on large products.
    bf16_peak = matmul_peak_gflops(torch.bfloat16, sizes=PEAK_SIZES, seconds=0.5)
    fp32_peak = matmul_peak_gflops(torch.float32, sizes=PEAK_SIZES, seconds=0.5)
    for precision in ("fp32", "bf16"):
        with _backend(model, precision) as be, torch.inference_mode():
            chain = BrickChain(be, cuda_graphs=True)
            _, ms = _timed_runs(lambda chain=chain: _run(chain, list(range(BIG)), whole=True), 3)
        tflops = flops / (ms * 1e-3) / 1e12
        report.add(
            "gpu flops", model=MODEL, size=f"{SIZE}x{SIZE}", batch=BIG, precision=precision, ms_per_run=ms,
            tflop_per_run=flops / 1e12, achieved_tflops=tflops, bf16_peak_tflops=bf16_peak / 1e3,
            fp32_peak_tflops=fp32_peak / 1e3, pct_bf16_peak=100 * tflops / (bf16_peak / 1e3),
            pct_fp32_peak=100 * tflops / (fp32_peak / 1e3),
        )  # fmt: skip


@needs_cuda
def test_gpu_memory(model, report):
    """Allocated CUDA memory before and after 100 whole-loop replays at batch 1: a replay allocates nothing."""
    from runtimes.chain import BrickChain

    with _backend(model) as be, torch.inference_mode():
        chain = BrickChain(be, cuda_graphs=True)
        _run(chain, [0], whole=True)  # captures
        _sync()
        before = _allocated()
        for i in range(100):
            _run(chain, [i], whole=True)  # the images it returns are dropped at once
        _sync()
        growth = _allocated() - before
        captures = chain.graphs.captures
    report.add(
        "gpu memory", model=MODEL, size=f"{SIZE}x{SIZE}", batch=1, replays=100, captures=captures,
        allocation_growth_bytes=growth, peak_cuda_mib=_peak_mib(),
    )  # fmt: skip
    assert captures == 1 and not growth > 0, f"{captures} captures, {growth} bytes more allocated after 100 replays"


@needs_cuda
def test_gpu_bf16_quality(report):
    """The shipped model at bf16 against fp32, whole-loop graphs: pixel differences and classifier accuracy."""
    from lego_model.checkpoints import load_checkpoint
    from lego_model.digits.classifier import load_classifier, predict, shipped_classifier
    from lego_model.shipped import shipped_checkpoint
    from runtimes.chain import BrickChain

    shipped = load_checkpoint(shipped_checkpoint()).eval().to(DEVICE)
    cfg = shipped.config
    classifier = load_classifier(shipped_classifier())
    per_class, r = PER_CLASS, cfg.resolution
    seeds = list(range(per_class * cfg.label_dim))
    classes = [s // per_class for s in seeds]
    images = {}
    for precision in ("fp32", "bf16"):
        with _backend(shipped, precision) as be, torch.inference_mode():
            chain = BrickChain(be, cuda_graphs=True)
            latents, labels, _ = draw_latents(seeds, cfg.img_channels, r, r, cfg.label_dim, classes)
            with chain.batch(labels.to(DEVICE), batch=len(seeds), height=r, width=r, num_steps=STEPS):
                images[precision] = chain.sample(latents.to(DEVICE), num_steps=STEPS).clamp(-1, 1).float().cpu()
    levels = (images["bf16"] - images["fp32"]).abs() * 127.5  # [-1, 1] -> uint8 levels
    accuracy = {}
    with torch.no_grad():
        for precision, x in images.items():
            pred, _ = predict(classifier, x)
            accuracy[precision] = float((pred == torch.tensor(classes)).float().mean())
    report.add(
        "gpu bf16 quality", model=cfg.name, images=len(seeds), steps=STEPS, mean_abs_levels=float(levels.mean()),
        max_abs_levels=float(levels.max()), accuracy_fp32=accuracy["fp32"], accuracy_bf16=accuracy["bf16"],
    )  # fmt: skip


# Kernel-name fragments by kind, for the sentence on where a replay's device time goes.
KINDS = {
    "matmul": ("gemm", "sm80_", "sm90_", "cutlass", "matmul", "xmma", "cublas"),
    "attention": ("flash", "attention", "fmha", "sdpa", "efficient"),
    "convolution": ("conv", "implicit"),
    "normalisation": ("norm",),
}


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, parts in KINDS.items() if any(p in low for p in parts)), "elementwise and other")


@needs_cuda
@pytest.mark.parametrize("batch", [1, BIG])
def test_gpu_profile(model, report, batch):
    """torch.profiler over one whole-loop replay: the top kernels and the device-time shares by kind."""
    from torch.profiler import ProfilerActivity, profile

    from runtimes.chain import BrickChain

    with _backend(model) as be, torch.inference_mode():
        chain = BrickChain(be, cuda_graphs=True)
        _run(chain, list(range(batch)), whole=True)  # captures
        _sync()
        activities = [ProfilerActivity.CPU] + ([] if FAKE else [ProfilerActivity.CUDA])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            _run(chain, list(range(batch)), whole=True)
            _sync()
            wall_ms = (time.perf_counter() - start) * 1e3
    out = artifact_dir() / f"profile_b{batch}.json"
    prof.export_chrome_trace(str(out))
    with open(out, "rb") as src, gzip.open(f"{out}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    out.unlink()
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) or math.nan
    by_kind: dict[str, float] = {}
    for e in events:
        by_kind[_kind(e.key)] = by_kind.get(_kind(e.key), 0.0) + e.self_device_time_total
    shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    report.notes.append(
        f"one whole-loop run at batch {batch} (profiled, {wall_ms:.1f} ms wall): kernels busy {total / 1e3:.1f} ms "
        f"({100 * total / 1e3 / wall_ms:.0f}% of the wall time); device time by kind: {shares}"
    )
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        report.add(
            "gpu profile", batch=batch, kernel=e.key[:90], kind=_kind(e.key), calls=e.count,
            device_ms=e.self_device_time_total / 1e3, pct_device_time=100 * e.self_device_time_total / total,
            run_wall_ms=wall_ms,
        )  # fmt: skip
