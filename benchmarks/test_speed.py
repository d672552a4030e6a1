"""Speed, efficiency and memory of every backend against eager fp32, measured side by side in one run.

Per (model, backend, batch, size): median ms per denoiser call (full stack,
no guidance), images/s of an 18-step Heun run (35 calls per image), the ratio
to eager in the same run, counted FLOPs over time against this machine's
measured matmul peak, and the peak resident memory while that backend ran.
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks.backends import DEVICE, available_backends, denoiser
from benchmarks.conftest import SHIPPED
from benchmarks.harness import PeakMemory, counted_flops, current_rss_mib, matmul_peak_gflops, time_ms
from lego_model.sampler import evaluations_per_step

pytestmark = pytest.mark.benchmark

CALLS_PER_IMAGE = sum(evaluations_per_step(18, "heun"))  # 35
MODELS = [SHIPPED, "lego_S_PG_64", "lego_S_PR_64", "lego_S_U_64"]
COMPILED = (SHIPPED, "lego_S_PG_64")


@pytest.fixture(scope="module")
def peaks(report):
    fp32 = matmul_peak_gflops(torch.float32)
    bf16 = matmul_peak_gflops(torch.bfloat16) if DEVICE.type == "cpu" and report.machine.get("avx512f") else None
    if DEVICE.type == "cuda":
        bf16 = matmul_peak_gflops(torch.bfloat16)
    report.add("machine peak", device=str(DEVICE), fp32_gflops=fp32, bf16_gflops=bf16 or float("nan"))
    report.notes.append(
        "fp32 peak: the best square matmul rate of torch and ONNX Runtime (MLAS is faster than torch's kernels here); "
        "bf16 peak: torch."
    )
    return fp32, bf16


def _grid(bm, name):
    """(batch, height, width) points: batch 1 over sizes, and a larger batch at the training size."""
    shapes = bm.shapes()
    r = bm.config.resolution
    points = [(1, *shapes["train"]), (4, *shapes["train"]), (1, *shapes["non-square"]), (1, *shapes["larger"])]
    if name == SHIPPED:
        points += [(16, r, r), (1, 4 * r, 4 * r)]
    return points


@pytest.mark.parametrize("name", MODELS)
def test_speed(bench_models, report, peaks, name):
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    bm = bench_models[name]
    cfg = bm.config
    fp32_peak, bf16_peak = peaks
    full = tuple(range(cfg.num_bricks))
    for batch, h, w in _grid(bm, name):
        x = torch.randn(batch, cfg.img_channels, h, w, dtype=torch.float64, device=DEVICE)
        sigma = torch.full((batch,), 1.3, dtype=torch.float64, device=DEVICE)
        labels = torch.eye(cfg.label_dim)[torch.arange(batch) % cfg.label_dim] if cfg.label_dim else None
        flops = counted_flops(functools.partial(bm.model.to(DEVICE), x, sigma, labels))
        eager_ms = None
        for backend in available_backends():
            # torch.compile costs a compilation per shape (a minute on this CPU): the peer is measured at
            # batch 1 and the training size of the shipped model and lego_S_PG_64.
            if backend == "compile" and ((batch, h, w) != (1, cfg.resolution, cfg.resolution) or name not in COMPILED):
                continue
            baseline = current_rss_mib()
            with PeakMemory() as mem:
                kw = dict(batch=batch, height=h, width=w, labels=labels)
                with denoiser(bm, backend, **kw) as fn:
                    repeats = 5 if h * w * batch <= 64 * 64 * 4 else 3
                    stats = time_ms(functools.partial(fn, x, sigma, full), warmup=2, repeats=repeats)
            ms = stats["median_ms"]
            if backend == "eager":
                eager_ms = ms
            gflops = flops / (ms * 1e-3) / 1e9
            report.add(
                "speed", model=name, backend=backend, batch=batch, size=f"{h}x{w}", pixels=h * w,
                ms_per_call=ms, ms_per_image_call=ms / batch,
                images_per_s=batch / (CALLS_PER_IMAGE * ms * 1e-3),
                speedup_vs_eager=(eager_ms / ms) if eager_ms else float("nan"),
            )  # fmt: skip
            report.add(
                "efficiency", model=name, backend=backend, batch=batch, size=f"{h}x{w}",
                gflop_per_call=flops / 1e9, achieved_gflops=gflops, pct_fp32_peak=100 * gflops / fp32_peak,
                pct_bf16_peak=100 * gflops / bf16_peak if bf16_peak else float("nan"),
            )  # fmt: skip
            report.add(
                "memory", model=name, backend=backend, batch=batch, size=f"{h}x{w}",
                peak_rss_mib=mem.rss_mib, rss_before_mib=baseline, peak_cuda_mib=mem.cuda_mib,
            )  # fmt: skip
