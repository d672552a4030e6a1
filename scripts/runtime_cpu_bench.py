"""CPU figures of the runtimes (issue 5): per-call speed of ONNX Runtime vs eager, skip savings, parity, memory.

    python scripts/runtime_cpu_bench.py [--engine-dir DIR] [--threads 1,2] [--reps 7]

lego_S_PG_64 with random weights (randomize_(0)), batch 1, 64x64.  Exports
its ONNX files with lego-export's pipeline (or reuses --engine-dir), then, in
one process and interleaved rep by rep so that machine load hits every
variant alike:

1. ms per denoiser call: eager fp32 model vs the ONNX Runtime chain (per thread count and ORT settings);
2. the time a skip plan saves per call vs the FLOP fraction it removes;
3. image parity ORT vs eager (max abs in [-1, 1]) for the full stack, a skip plan, guidance, and 64x128;
4. resident memory growth of the ORT chain over a 100-step Euler run.

Prints a plain-text report; numbers are medians of ``--reps`` timed calls after warm-up.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import torch

from lego_model import LegoModel, SkipPlan, get_config
from lego_model.eager import sample_images
from lego_model.flops import denoiser_flops
from lego_model.sampler import draw_latents, edm_sample
from runtimes.backends.ort import OnnxRuntimeBackend
from runtimes.chain import BrickChain

NAME = "lego_S_PG_64"


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def export(model: LegoModel, out: Path) -> Path:
    from export.manifest import CheckpointRecord, load_manifest
    from export.pipeline import ExportOptions, export_engine_dir

    if (out / "manifest.json").is_file():
        load_manifest(out)
        return out
    record = CheckpointRecord.random_init(0)
    export_engine_dir(model, out, record, ExportOptions(engines="onnx", precision="fp32"), progress=print)
    return out


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine-dir", type=Path, default=Path("/tmp/lego_bench_engines") / NAME)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--parity-steps", type=int, default=8)
    ap.add_argument("--skip-parts", default="", help="comma list of parts to leave out: speed,skip,parity,run,memory")
    args = ap.parse_args()
    skip = set(filter(None, args.skip_parts.split(",")))
    cfg = get_config(NAME)
    model = LegoModel(cfg).randomize_(0).eval()
    engine_dir = export(model, args.engine_dir)
    from export.manifest import load_manifest

    manifest = load_manifest(engine_dir)
    H = W = cfg.resolution
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.img_channels, H, W, generator=gen, dtype=torch.float64) * 2.5
    sigma = torch.tensor([2.5], dtype=torch.float64)
    labels = torch.eye(cfg.label_dim)[[7]]
    full = tuple(range(cfg.num_bricks))
    print(f"{NAME} random init, batch 1, {H}x{W}, torch {torch.__version__}")

    for threads in [int(t) for t in args.threads.split(",")]:
        if "speed" in skip and "skip" in skip:
            break
        torch.set_num_threads(threads)
        variants = {"eager fp32": lambda act: model(x, sigma, labels, act)}
        backends = []
        for label, kw in {
            "ORT all": dict(optimization="all"),  # the backend's defaults: no spinning threads
            "ORT all, spinning": dict(optimization="all", spin=True),
            "ORT basic": dict(optimization="basic"),
            "ORT fusions": dict(optimization="fusions"),
        }.items():
            be = OnnxRuntimeBackend(manifest, engine_dir, device=torch.device("cpu"), threads=threads, **kw)
            be.load()
            chain = BrickChain(be, check_finite=True)
            chain.begin(labels, batch=1, height=H, width=W)
            variants[label] = chain
            backends.append(be)
        skip_sets = {"full": full, "no global (0,1)": (0, 1), "no local (1,2)": (1, 2)}
        times: dict[tuple[str, str], list[float]] = {}
        with torch.no_grad():
            for fn in variants.values():
                fn(x, sigma, full) if fn is not variants["eager fp32"] else fn(full)  # warm-up
            for _ in range(args.reps):
                for vname, fn in variants.items():
                    for sname, act in skip_sets.items():
                        if sname != "full" and (vname not in ("eager fp32", "ORT all") or "skip" in skip):
                            continue
                        call = (
                            (lambda a=act, f=fn: f(a))
                            if vname == "eager fp32"
                            else (lambda a=act, f=fn: f(x, sigma, a))
                        )
                        times.setdefault((vname, sname), []).extend(timed(call, 1))
        eager = statistics.median(times[("eager fp32", "full")])
        print(f"\n-- {threads} thread(s): ms per denoiser call (median of {args.reps}, interleaved)")
        for (vname, sname), ts in times.items():
            med = statistics.median(ts)
            print(f"  {vname:18s} {sname:16s} {med:8.1f} ms  (min {min(ts):7.1f})  eager/this {eager / med:5.2f}x")
        fl_full = denoiser_flops(cfg, H, W, full)
        for vname in ("eager fp32", "ORT all"):
            base = statistics.median(times[(vname, "full")])
            for sname, act in skip_sets.items():
                if sname == "full" or (vname, sname) not in times:
                    continue
                removed = 1 - denoiser_flops(cfg, H, W, act) / fl_full
                saved = 1 - statistics.median(times[(vname, sname)]) / base
                print(
                    f"  skip {sname:16s} {vname:10s}: removes {removed:6.1%} of FLOPs, saves {saved:6.1%} of time "
                    f"(ratio {saved / removed:4.2f})"
                )
        for be in backends:
            be.close()

    torch.set_num_threads(int(args.threads.split(",")[-1]))
    if "parity" not in skip:
        print(f"\n-- image parity, ORT (fp32, CPU) vs eager, {args.parity_steps} Heun steps, seeds 0-1")
        cases = {
            "full stack": dict(plan=[], cfg_scale=None, size=(H, W)),
            "skip global@0.6 + local@0.3": dict(plan=["2@0.6:1", "0@0:0.3"], cfg_scale=None, size=(H, W)),
            "guidance 2.0, class 3": dict(plan=[], cfg_scale=2.0, size=(H, W), class_idx=3),
            "64x128 (non-square, larger)": dict(plan=["2@0.6:1"], cfg_scale=None, size=(H, 2 * W)),
        }
        be = OnnxRuntimeBackend(
            manifest, engine_dir, device=torch.device("cpu"), threads=int(args.threads.split(",")[-1])
        )
        with be, torch.no_grad():
            chain = BrickChain(be)
            for cname, c in cases.items():
                plan = SkipPlan.parse(c["plan"], cfg.num_bricks)
                h, w = c["size"]
                seeds = [0, 1]
                batch = len(seeds)
                want = sample_images(
                    model,
                    seeds,
                    height=h,
                    width=w,
                    num_steps=args.parity_steps,
                    plan=plan,
                    cfg_scale=c["cfg_scale"],
                    class_idx=c.get("class_idx"),
                )
                lat, lab, rnd = draw_latents(seeds, cfg.img_channels, h, w, cfg.label_dim, c.get("class_idx"))
                chain.begin(lab, batch=batch, height=h, width=w, cfg_scale=c["cfg_scale"], num_steps=args.parity_steps)
                got = edm_sample(
                    chain,
                    lat,
                    num_steps=args.parity_steps,
                    randn_like=rnd.randn_like,
                    active_per_step=plan.steps(args.parity_steps),
                )
                chain.end()
                print(f"  {cname:30s} max abs {(got - want).abs().max().item():.2e}")

    if "run" not in skip:
        print("\n-- whole sampling runs (ORT chain, batch 1, 18 Heun steps): skip preset vs full stack")
        be = OnnxRuntimeBackend(
            manifest, engine_dir, device=torch.device("cpu"), threads=int(args.threads.split(",")[-1])
        )
        with be, torch.no_grad():
            chain = BrickChain(be)
            lat, lab, _ = draw_latents([0], cfg.img_channels, H, W, cfg.label_dim)
            seconds = {}
            plans = {"full": SkipPlan(cfg.num_bricks), "global@0.6": SkipPlan.preset("global@0.6", cfg)}
            for _ in range(2):  # alternate, keep the second round
                for pname, plan in plans.items():
                    chain.begin(lab, batch=1, height=H, width=W, num_steps=18)
                    t0 = time.perf_counter()
                    edm_sample(chain, lat, num_steps=18, active_per_step=plan.steps(18), randn_like=torch.zeros_like)
                    seconds[pname] = time.perf_counter() - t0
            cost = plans["global@0.6"].relative_cost(cfg, 18, "heun", H, W)
            saved = 1 - seconds["global@0.6"] / seconds["full"]
            print(
                f"  full {seconds['full']:.2f} s, global@0.6 {seconds['global@0.6']:.2f} s: removes {1 - cost:.1%} "
                f"of FLOPs, saves {saved:.1%} of time (ratio {saved / (1 - cost):.2f})"
            )

    if "memory" not in skip:
        print("\n-- memory over a 100-step Euler run (ORT chain, batch 1)")
        be = OnnxRuntimeBackend(
            manifest, engine_dir, device=torch.device("cpu"), threads=int(args.threads.split(",")[-1])
        )
        with be, torch.no_grad():
            chain = BrickChain(be)
            lat, lab, rnd = draw_latents([0], cfg.img_channels, H, W, cfg.label_dim)
            chain.begin(lab, batch=1, height=H, width=W, num_steps=100, solver="euler")
            marks: dict[int, float] = {}
            steps = SkipPlan.preset("global@0.6", cfg).steps(100)
            edm_sample(
                chain,
                lat,
                num_steps=100,
                solver="euler",
                active_per_step=steps,
                randn_like=torch.zeros_like,
                on_step=lambda i: marks.__setitem__(i, rss_mib()),
            )
            chain.end()
        print(
            f"  RSS after step 10: {marks[10]:.1f} MiB, after step 60: {marks[60]:.1f} MiB, "
            f"after step 99: {marks[99]:.1f} MiB (growth 10->99: {marks[99] - marks[10]:+.1f} MiB)"
        )


if __name__ == "__main__":
    main()
