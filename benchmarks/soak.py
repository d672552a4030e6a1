"""Soak: many mixed requests through one process, every result against eager, resident memory along the way.

    python -m benchmarks.soak            # the shipped model, 200 requests per backend (its ONNX export made here)
    python -m benchmarks.soak --engine-dir engines/ --requests 50 --backend onnxruntime-cpu --no-arena

A service keeps a model loaded and answers requests of any size, batch,
class, guidance and skip plan, one after another.  This runs such a mix
(:func:`mixed_requests`) through :class:`runtimes.Generator` -- several
generators (chains) sharing one backend, requests dealt among them -- and
compares every result with the eager model (``lego_model.eager.sample_images``,
same seeds).  Without ``--backend`` each backend configuration runs in its own
process (torch; ONNX Runtime CPU with and without its memory arena), so that
resident memory is each one's own, and a table is printed: max relative error
over the soak, RSS after 10/50/100/200 requests, requests and images per
second (generator time only; the eager references are not counted).
tests/runtimes/test_soak.py runs a shorter mix on a tiny config.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.harness import current_rss_mib
from lego_model.configs import LegoConfig
from lego_model.eager import sample_images
from lego_model.files import write_atomic
from lego_model.model import LegoModel

CHECKPOINTS = (10, 50, 100, 200)  # RSS is reported after these many requests
CONFIGS = {
    "torch": ["--backend", "torch"],
    "onnxruntime-cpu": ["--backend", "onnxruntime-cpu"],
    "onnxruntime-cpu, arena off": ["--backend", "onnxruntime-cpu", "--no-arena"],
}


def mixed_requests(config: LegoConfig, n: int, *, seed: int = 0, max_batch: int = 4, max_side: int | None = None,
                   steps: tuple[int, ...] = (2, 3, 4)) -> Iterator[dict]:  # fmt: skip
    """``n`` requests mixing sizes, batches, guidance on/off and scales, skip plans, classes, solvers and churn."""
    rnd = random.Random(seed)
    m, res = config.size_multiple, config.resolution
    sides = [s for s in range(m, (max_side or 2 * res) + 1, m)]
    plans: list[str | None] = [None, "global@0.6", f"{config.num_bricks - 1}@0.5:1", "0@0:0.5"]
    if config.global_bricks != config.local_bricks:
        plans.append("local@0.3")
    for _ in range(n):
        batch = rnd.randint(1, max_batch)
        guided = bool(config.label_dim) and rnd.random() < 0.5
        classes: int | list[int] | None = None  # random per seed, one for all, or one per seed
        kind = rnd.choice(["random", "one", "per seed"]) if config.label_dim else "random"
        if kind == "one":
            classes = rnd.randrange(config.label_dim)
        elif kind == "per seed":
            classes = [rnd.randrange(config.label_dim) for _ in range(batch)]
        yield dict(
            seeds=[rnd.randrange(10_000) for _ in range(batch)],
            classes=classes,
            size=(rnd.choice(sides), rnd.choice(sides)),
            plan=rnd.choice(plans),
            cfg_scale=rnd.choice([1.5, 2.0, 4.0]) if guided else None,
            steps=rnd.choice(steps),
            solver=rnd.choice(["heun", "euler"]),
            S_churn=rnd.choice([0.0, 0.0, 5.0]),
        )


def eager_images(model: LegoModel, request: dict) -> torch.Tensor:
    """The eager model's images for a request of :func:`mixed_requests`."""
    return sample_images(model, **request)


@dataclass
class SoakResult:
    requests: int = 0
    images: int = 0
    seconds: float = 0.0  # in Generator.generate only
    max_rel_err: float = 0.0
    compared: int = 0  # requests compared with eager
    rss_mib: dict[int, float] = field(default_factory=dict)  # after N requests


def soak(generators: list, model: LegoModel, requests: list[dict], checkpoints=CHECKPOINTS,
         eager_every: int = 1) -> SoakResult:  # fmt: skip
    """Deal ``requests`` round-robin to ``generators`` (which may share a backend); compare with eager.

    Every ``eager_every``-th request is compared (1: all of them).
    """
    out = SoakResult()
    for i, request in enumerate(requests, 1):
        gen = generators[i % len(generators)]
        t0 = time.perf_counter()
        got = gen.generate(**request)
        out.seconds += time.perf_counter() - t0
        if i % eager_every == 0:
            want = eager_images(model, request)
            err = ((got.cpu() - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
            out.max_rel_err = max(out.max_rel_err, err)
            out.compared += 1
        out.requests, out.images = i, out.images + len(request["seeds"])
        if i in checkpoints:
            out.rss_mib[i] = current_rss_mib()
    return out


def run_one(args: argparse.Namespace) -> dict:
    """One backend configuration in this process."""
    from lego_model.checkpoints import load_checkpoint
    from lego_model.shipped import shipped_checkpoint
    from runtimes import Generator, open_backend

    torch.set_num_threads(args.threads)
    model = load_checkpoint(shipped_checkpoint())
    backend, _ = open_backend(
        args.backend,
        engine_dir=args.engine_dir,
        threads=args.threads,
        ort_arena=not args.no_arena,
        **({"device": "cpu"} if args.backend == "torch" else {}),
    )
    steps = tuple(int(s) for s in args.steps.split(","))
    requests = list(mixed_requests(model.config, args.requests, max_batch=args.max_batch, steps=steps))
    with backend:
        generators = [Generator(backend, max_buffer_sets=args.buffer_sets) for _ in range(args.chains)]
        result = soak(generators, model, requests, eager_every=args.eager_every)
        kept = [len(g.chain) for g in generators]
    return {
        "backend": args.backend + (", arena off" if args.no_arena else ""),
        "requests": result.requests,
        "images": result.images,
        "requests_per_s": result.requests / result.seconds,
        "images_per_s": result.images / result.seconds,
        "max_rel_err": result.max_rel_err,
        "compared": result.compared,
        "rss_mib": {str(k): v for k, v in result.rss_mib.items()},
        "buffer_sets_kept": kept,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine-dir", help="ONNX engine directory of the shipped model [default: export one]")
    parser.add_argument("--backend", choices=["torch", "onnxruntime-cpu"], help="[default: every configuration]")
    parser.add_argument("--no-arena", action="store_true", help="ONNX Runtime's CPU memory arena off")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--chains", type=int, default=3, help="generators sharing the backend")
    parser.add_argument("--buffer-sets", type=int, default=8, help="buffer sets kept per chain")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", default="4,8,18", help="sampling steps the requests choose from")
    parser.add_argument("--max-batch", type=int, default=8, help="largest request")
    parser.add_argument("--eager-every", type=int, default=1, help="compare every Nth request with eager")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if args.backend:
        print(json.dumps(run_one(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = args.engine_dir
        if engine_dir is None:
            engine_dir = str(Path(tmp) / "engines")
            subprocess.run([sys.executable, "-m", "export", "--engines", "onnx", "--out", engine_dir], check=True)
        rows = []
        for name, extra in CONFIGS.items():
            cmd = [sys.executable, "-m", "benchmarks.soak", "--engine-dir", engine_dir, *extra]
            cmd += ["--requests", str(args.requests), "--chains", str(args.chains), "--threads", str(args.threads)]
            cmd += ["--buffer-sets", str(args.buffer_sets), "--steps", args.steps, "--max-batch", str(args.max_batch)]
            cmd += ["--eager-every", str(args.eager_every)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"{name}: done", file=sys.stderr)
    cpu = _cpu_name()
    print(f"soak: shipped model, {args.requests} mixed requests (steps {args.steps}, batch 1-{args.max_batch}), "
          f"{args.chains} chains per backend, {args.threads} threads, every {args.eager_every} against eager; "
          f"{cpu}")  # fmt: skip
    marks = [c for c in CHECKPOINTS if c <= args.requests]
    print("| backend | max rel. error | " + " | ".join(f"RSS@{c} MiB" for c in marks) + " | requests/s | images/s |")
    print("|---|---|" + "---|" * len(marks) + "---|---|")
    for r in rows:
        rss = " | ".join(f"{r['rss_mib'][str(c)]:.0f}" for c in marks)
        speed = f"{r['requests_per_s']:.2f} | {r['images_per_s']:.1f}"
        print(f"| {r['backend']} | {r['max_rel_err']:.1e} | {rss} | {speed} |")
    if args.json:
        write_atomic(args.json, json.dumps({"cpu": cpu, "rows": rows}, indent=2))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
