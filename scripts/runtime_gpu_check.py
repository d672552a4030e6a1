"""GPU check of the runtimes (issue 5): CUDA graphs vs no graphs with the torch backend, parity and timing.

    python scripts/runtime_gpu_check.py            # about 1-3 minutes on one H100; one process, no network

lego_S_PG_64 with random weights (randomize_(0)).  For batch 1 and 8 at 64x64:

* ms per denoiser call (CUDA events, after warm-up): eager model, torch-backend chain without graphs,
  chain with CUDA graphs; ratios to eager (target: graphs >= 2x eager at batch 1);
* a whole 18-step Heun run with a skip plan (global@0.6) and with guidance: images with graphs vs without
  (max abs, target: fp32 rounding) and vs eager CPU-seeded sampling on the GPU;
* graphs captured, allocation growth across a replayed run, peak memory.

Exit status 1 when a parity check fails.  Paste the output into the issue note.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from lego_model import LegoModel, SkipPlan, get_config
from lego_model.sampler import draw_latents, edm_sample
from runtimes.backends.torch_backend import TorchBackend
from runtimes.chain import BrickChain

NAME = "lego_S_PG_64"


def per_call_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run(chain: BrickChain, seeds, steps: int, plan: SkipPlan, cfg_scale=None, size=64):
    cfg = chain.config
    lat, lab, _ = draw_latents(seeds, cfg.img_channels, size, size, cfg.label_dim)
    chain.begin(lab, batch=len(seeds), height=size, width=size, cfg_scale=cfg_scale, num_steps=steps)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = edm_sample(chain, lat.to(chain.device), num_steps=steps, active_per_step=plan.steps(steps))
    chain.end()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def check_batch(model: LegoModel, backend: TorchBackend, batch: int, iters: int) -> None:
    """Per-call timing of eager, chain and chain with graphs at one batch size, and one-call parity."""
    cfg, dev = model.config, backend.device
    full = tuple(range(cfg.num_bricks))
    x = torch.randn(batch, cfg.img_channels, 64, 64, dtype=torch.float64, device=dev) * 2
    sigma = torch.full((batch,), 2.5, dtype=torch.float64, device=dev)
    labels = torch.eye(cfg.label_dim, device=dev)[torch.arange(batch) % cfg.label_dim]
    plain, graphed = BrickChain(backend, cuda_graphs=False), BrickChain(backend, cuda_graphs=True)
    for chain in (plain, graphed):
        chain.begin(labels, batch=batch, height=64, width=64)
    eager_ms = per_call_ms(lambda: model(x, sigma, labels, full), iters)
    plain_ms = per_call_ms(lambda: plain(x, sigma, full), iters)
    graph_ms = per_call_ms(lambda: graphed(x, sigma, full), iters)
    skip_ms = per_call_ms(lambda: graphed(x, sigma, (0, 1)), iters)
    print(
        f"batch {batch}: ms per denoiser call: eager {eager_ms:.2f}, chain {plain_ms:.2f}, "
        f"chain+graphs {graph_ms:.2f} ({eager_ms / graph_ms:.2f}x eager); "
        f"graphs without the global brick {skip_ms:.2f}"
    )
    d_plain = plain(x, sigma, full).clone()
    d_graph = graphed(x, sigma, full).clone()
    d_eager = model(x, sigma, labels, full)
    print(
        f"  one call: graphs vs no graphs max abs {(d_graph - d_plain).abs().max().item():.2e}, "
        f"vs eager {(d_graph - d_eager).abs().max().item():.2e}"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--batches", default="1,8")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check")
        return 1
    dev = torch.device("cuda", 0)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity, as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    cfg = get_config(NAME)
    model = LegoModel(cfg).randomize_(0).eval()
    print(f"{NAME} random init on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, fp32, TF32 off")
    failed = False
    with TorchBackend(model, device=dev) as backend, torch.no_grad():
        for batch in [int(b) for b in args.batches.split(",")]:
            check_batch(model, backend, batch, args.iters)

        plan = SkipPlan.preset("global@0.6", cfg)
        for cfg_scale in (None, 2.0):
            plain, graphed = BrickChain(backend, cuda_graphs=False), BrickChain(backend, cuda_graphs=True)
            a, t_plain = run(plain, [0, 1, 2, 3], 18, plan, cfg_scale)
            b, t_first = run(graphed, [0, 1, 2, 3], 18, plan, cfg_scale)  # captures
            torch.cuda.synchronize()
            mem = torch.cuda.memory_allocated(dev)
            c, t_replay = run(graphed, [0, 1, 2, 3], 18, plan, cfg_scale)
            same = (b - c).abs().max().item()
            del c  # what is left allocated beyond the state before the run is growth
            torch.cuda.synchronize()
            growth = torch.cuda.memory_allocated(dev) - mem
            err = (a - b).abs().max().item()
            # The first graphed run computed each key's first call eagerly (warm-up), later runs only replay.
            ok = err <= 1e-4 and same <= 1e-5 and growth <= 0
            failed |= not ok
            print(
                f"18 Heun steps, batch 4, global@0.6, cfg {cfg_scale}: no graphs {t_plain * 1000:.0f} ms, "
                f"graphs first run {t_first * 1000:.0f} ms, replayed run {t_replay * 1000:.0f} ms; "
                f"{len(graphed.graphs)} graphs; max abs graphs vs none {err:.2e}, replay vs first {same:.1e}; "
                f"allocation growth {growth} B -> {'OK' if ok else 'FAIL'}"
            )
    print(f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
