"""The runtime's own figures: ONNX Runtime settings and memory over a long run (CUDA graphs: test_gpu.py).

* ``ort settings``: ms per denoiser call of the ONNX Runtime chain per thread count and session option
  (graph optimization level, spinning threads) next to eager fp32 at the same thread count, interleaved
  repeat by repeat so that machine load hits every variant alike (the figures behind the defaults of
  :class:`runtimes.backends.ort.OnnxRuntimeBackend`).
* ``memory: 100-step run``: resident memory (and allocated CUDA memory) at steps 10, 60 and 99 of a
  100-step Euler run with a skip plan, after a warm-up run that met every active set: a chain that
  allocates per call grows here.
"""

from __future__ import annotations

import contextlib
import functools
import statistics

import pytest
import torch

from benchmarks.backends import DEVICE, available_backends, chain_batch, denoiser, precision_of
from benchmarks.conftest import SHIPPED
from benchmarks.harness import PeakMemory, current_rss_mib, time_ms
from lego_model import SkipPlan, draw_latents, edm_sample

pytestmark = pytest.mark.benchmark

ENGINE_BACKENDS = [b for b in available_backends() if b not in ("eager", "compile")]
# Graphs against no graphs: same kernels, so fp32 rounding apart at most; a replay repeats its capture exactly.
GRAPH_TOLERANCE = {"run_max_abs": 1e-4, "replay_max_abs": 1e-5, "growth_bytes": 0}


def _inputs(cfg, batch: int, h: int, w: int):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(batch, cfg.img_channels, h, w, generator=g, dtype=torch.float64) * 2.5).to(DEVICE)
    sigma = torch.full((batch,), 2.5, dtype=torch.float64, device=DEVICE)
    labels = torch.eye(cfg.label_dim)[torch.arange(batch) % cfg.label_dim] if cfg.label_dim else None
    return x, sigma, labels


def _timed(run, fn, latents):
    """(images, ms) of one whole sampling run."""
    out = {}
    stats = time_ms(lambda: out.__setitem__("images", run(fn, latents)), warmup=0, repeats=1)
    return out["images"], stats["median_ms"]


def test_ort_settings(bench_models, report):
    """ms per call of lego_S_PG_64 (batch 1, 64x64): ONNX Runtime per thread count and option vs eager."""
    name = "lego_S_PG_64"
    if name not in bench_models or DEVICE.type != "cpu":
        pytest.skip("measured on the CPU with lego_S_PG_64")
    from export.manifest import load_manifest
    from runtimes.backends.ort import OnnxRuntimeBackend

    bm = bench_models[name]
    cfg = bm.config
    h = w = cfg.resolution
    x, sigma, labels = _inputs(cfg, 1, h, w)
    full = tuple(range(cfg.num_bricks))
    manifest = load_manifest(bm.engine_dir)
    all_threads = torch.get_num_threads()
    # The options matter where every core is used; one thread shows how the default scales.
    settings = {1: {"all": {}}, all_threads: {"all": {}, "all, spinning": {"spin": True}, "basic": {}, "fusions": {}}}
    try:
        for threads, variants in settings.items():
            torch.set_num_threads(threads)
            fns = {"eager fp32": functools.partial(bm.model.cpu(), x, sigma, labels, full)}
            with torch.inference_mode(), contextlib.ExitStack() as stack:
                for label, kw in variants.items():
                    opt = label.split(",")[0]
                    be = OnnxRuntimeBackend(
                        manifest, bm.engine_dir, device=DEVICE, threads=threads, optimization=opt, **kw
                    )
                    stack.enter_context(be)
                    _, fn = stack.enter_context(chain_batch(be, labels, batch=1, height=h, width=w))
                    fns[f"onnxruntime {label}"] = functools.partial(fn, x, sigma, full)
                for fn in fns.values():
                    fn()  # warm-up
                samples: dict[str, list[float]] = {}
                for _ in range(5):
                    for label, fn in fns.items():
                        samples.setdefault(label, []).append(time_ms(fn, warmup=0, repeats=1)["median_ms"])
            eager = statistics.median(samples["eager fp32"])
            for label, ms in samples.items():
                med = statistics.median(ms)
                report.add(
                    "ort settings", model=name, threads=threads, variant=label, size=f"{h}x{w}", batch=1,
                    ms_per_call=med, min_ms=min(ms), repeats=len(ms), speedup_vs_eager=eager / med,
                )  # fmt: skip
    finally:
        torch.set_num_threads(all_threads)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", [SHIPPED, "lego_S_PG_64"])
def test_long_run_memory(bench_models, report, name, backend):
    """Resident (and CUDA) memory along a 100-step Euler run of the chain, batch 1, global@0.6 plan."""
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    bm = bench_models[name]
    bm.engines(precision_of(backend))  # skips a model without engines of this precision
    cfg = bm.config
    h = w = cfg.resolution
    steps = 100
    latents, labels, _ = draw_latents([0], cfg.img_channels, h, w, cfg.label_dim)
    plan = SkipPlan.preset("global@0.6", cfg)
    marks = {10: {}, 60: {}, 99: {}}

    def mark(i: int) -> None:
        if i in marks:
            marks[i]["rss"] = current_rss_mib()
            if DEVICE.type == "cuda":
                marks[i]["cuda"] = torch.cuda.memory_allocated() / 2**20

    kw = dict(batch=1, height=h, width=w, labels=labels, num_steps=steps)
    with torch.inference_mode(), PeakMemory() as mem, denoiser(bm, backend, **kw) as fn:
        run = functools.partial(edm_sample, fn, latents.to(DEVICE), solver="euler", randn_like=torch.zeros_like)
        run(num_steps=10, active_per_step=plan.steps(10))  # warm-up: meets both active sets of the plan
        run(num_steps=steps, active_per_step=plan.steps(steps), on_step=mark)
    cuda = {f"cuda_mib_step{i}": m.get("cuda", float("nan")) for i, m in marks.items()}
    report.add(
        "memory: 100-step run", model=name, backend=backend, size=f"{h}x{w}", solver="euler", plan="global@0.6",
        rss_mib_step10=marks[10]["rss"], rss_mib_step60=marks[60]["rss"], rss_mib_step99=marks[99]["rss"],
        rss_growth_10_99_mib=marks[99]["rss"] - marks[10]["rss"], peak_rss_mib=mem.rss_mib, **cuda,
    )  # fmt: skip
