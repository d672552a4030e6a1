"""Sample images through an engine directory: ``python -m runtimes.sample --engine-dir engines/``.

One PNG per seed (``000042.png``), a grid of the first 64 seeds, optionally
an npz (uint8 NHWC ``arr_0``, the input format of the ADM evaluation suite the
LEGO authors use), and a summary: backend, precision, CUDA graphs, images/s,
ms per denoiser call, the skip plan and its relative cost.  Same seeds and
plan give the eager model's images (``python -m lego_model.generate``): the
latents and churn noise come from the same per-seed generators.

Under ``torchrun`` every rank samples its share of the seeds on device
LOCAL_RANK; rank 0 writes the npz and the grid after all ranks are done.
Everything that can be refused is refused before the first denoiser call.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from lego_model.errors import LegoError
from lego_model.images import make_grid, parse_seeds, save_image
from lego_model.sampler import evaluations_per_step
from lego_model.skip import SkipPlan
from runtimes import distributed
from runtimes.backends import BACKENDS, open_backend
from runtimes.backends.ort import default_threads
from runtimes.errors import OutputError
from runtimes.generator import Generator

log = logging.getLogger(__name__)

GRID_MAX = 64  # images in grid.png


@dataclass
class SampleOptions:
    """Every knob of a sampling run (the CLI's options)."""

    engine_dir: str | None = None
    backend: str = "auto"
    checkpoint: str | None = None
    seeds: str = "0-15"
    batch: int | None = None
    steps: int = 18
    solver: str = "heun"
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    class_idx: int | None = None
    cfg_scale: float | None = None
    skip: tuple[str, ...] = ()
    skip_preset: tuple[str, ...] = ()
    height: int | None = None
    width: int | None = None
    out: str = "samples"
    npz: str | None = None
    resume: bool = False
    cuda_graphs: bool = True
    threads: int | None = None
    ort_optimization: str = "all"


@dataclass
class SampleReport:
    """What a run did, for the summary (and the tests)."""

    backend: str
    why: str
    precision: str
    device: str
    graphs: bool
    plan_text: str
    images: int = 0
    skipped_existing: int = 0
    calls: int = 0
    seconds: float = 0.0  # steady state: batches after the first when there are several
    seconds_total: float = 0.0
    steady_calls: int = 0
    steady_images: int = 0
    files: list[Path] = field(default_factory=list)

    @property
    def ms_per_call(self) -> float:
        return 1000 * self.seconds / self.steady_calls if self.steady_calls else float("nan")

    @property
    def images_per_second(self) -> float:
        return self.steady_images / self.seconds if self.seconds else float("nan")

    def summary(self, ms_per_call: float | None = None) -> str:
        ips = self.images_per_second
        ms = self.ms_per_call if ms_per_call is None else ms_per_call
        lines = [
            f"backend: {self.backend} ({self.why}) on {self.device}, precision {self.precision}, "
            f"CUDA graphs {'on' if self.graphs else 'off'}",
            f"sampled {self.images} images ({self.skipped_existing} already there) in {self.seconds_total:.2f} s: "
            f"{ips:.2f} images/s, {ms:.1f} ms per denoiser call"
            + (" (first batch excluded as warm-up)" if self.seconds != self.seconds_total else ""),
            self.plan_text,
        ]
        return "\n".join(lines)


def check_writable(directory: Path) -> None:
    """Create ``directory`` and prove a file can be written there (OutputError otherwise)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as err:
        raise OutputError(f"cannot write to {directory} ({err.strerror or err}); choose another --out/--npz") from None


def seed_png(out: Path, seed: int) -> Path:
    return out / f"{seed:06d}.png"


def write_png(image: np.ndarray, path: Path) -> None:
    """Write via a temporary name and a rename, so that an existing PNG always is a complete image."""
    tmp = path.with_name(f".{path.stem}.tmp.png")
    save_image(image, tmp)
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    """uint8 HWC (grayscale files come back with one channel)."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def assemble(out: Path, seeds: list[int], npz: Path | None) -> list[Path]:
    """grid.png of the first seeds and the npz of all seeds, read back from the per-seed PNGs."""
    written = []
    grid_imgs = np.stack([read_png(seed_png(out, s)) for s in seeds[:GRID_MAX]])
    tmp = out / ".grid.tmp.png"
    save_image(make_grid(grid_imgs), tmp)
    os.replace(tmp, out / "grid.png")
    written.append(out / "grid.png")
    if npz is not None:
        arr = np.stack([read_png(seed_png(out, s)) for s in seeds])  # (N, H, W, C) uint8
        tmp = npz.with_name(f".{npz.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=arr)
        os.replace(tmp, npz)
        written.append(npz)
    return written


def batches(seeds: list[int], size: int) -> list[list[int]]:
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


@dataclass
class SamplingRun:
    """A run that passed every check: its generator (loaded by ``with run.generator``) and this rank's work."""

    opts: SampleOptions
    info: distributed.RankInfo
    generator: Generator
    height: int
    width: int
    plan: SkipPlan
    seeds: list[int]  # every seed of the run (rank 0 assembles the grid and npz from all of them)
    groups: list[list[int]]  # this rank's batches
    out: Path
    npz: Path | None
    report: SampleReport


def prepare_run(opts: SampleOptions, info: distributed.RankInfo) -> SamplingRun:
    """Every refusal, before any compute: backend, sizes, class, guidance, plan, profiles, output paths."""
    threads = opts.threads or default_threads(info.local_world_size)
    backend, why = open_backend(
        opts.backend,
        engine_dir=opts.engine_dir,
        checkpoint=opts.checkpoint,
        local_rank=info.local_rank,
        threads=threads,
        ort_optimization=opts.ort_optimization,
    )
    gen = Generator(backend, cuda_graphs=opts.cuda_graphs, why=why)
    cfg = gen.config
    height, width = opts.height or cfg.resolution, opts.width or cfg.resolution
    seeds = parse_seeds(opts.seeds)
    plan = SkipPlan.from_text(cfg, opts.skip, opts.skip_preset)
    batch = opts.batch or gen.max_batch(opts.cfg_scale is not None)
    out = Path(opts.out)
    npz = Path(opts.npz) if opts.npz else None
    todo = distributed.shard(seeds, info.rank, info.world_size)
    skipped = 0
    if opts.resume:
        remaining = [s for s in todo if not seed_png(out, s).is_file()]
        skipped, todo = len(todo) - len(remaining), remaining
    groups = batches(todo, batch)
    for group in [[0] * batch, *({len(g): g for g in groups}.values())]:  # every batch size a request will have
        gen.check(group, **request_args(opts, height, width, plan, batch))
    check_writable(out)
    if npz is not None:
        check_writable(npz.parent)
    if backend.device.type == "cpu":
        torch.set_num_threads(threads)
    else:  # CUDA graph capture and the libraries' handles follow the current device
        torch.cuda.set_device(backend.device)
    report = SampleReport(
        backend=backend.name,
        why=why,
        precision=backend.precision,
        device=str(backend.device),
        graphs=gen.chain.graphs is not None,
        plan_text=plan.describe(cfg, opts.steps, opts.solver, height, width),
        skipped_existing=skipped,
    )
    return SamplingRun(opts, info, gen, height, width, plan, seeds, groups, out, npz, report)


def request_args(opts: SampleOptions, height: int, width: int, plan: SkipPlan, batch: int) -> dict:
    """The ``Generator.generate`` arguments of one batch of this run (all but its seeds)."""
    return dict(
        classes=opts.class_idx,
        size=(height, width),
        plan=plan,
        cfg_scale=opts.cfg_scale,
        steps=opts.steps,
        solver=opts.solver,
        S_churn=opts.S_churn,
        S_min=opts.S_min,
        S_max=opts.S_max,
        S_noise=opts.S_noise,
        batch=batch,
        output="uint8",
    )


def sample_batches(run: SamplingRun, progress: bool = True) -> Iterator[tuple[list[int], np.ndarray]]:
    """Sample this rank's batches: (seeds, uint8 NHWC images) per batch; timing goes into ``run.report``.

    Each batch is one ``Generator.generate`` request; call it inside ``with run.generator``.
    """
    opts, info, report = run.opts, run.info, run.report
    calls_per_batch = sum(evaluations_per_step(opts.steps, opts.solver))
    for i, group in enumerate(run.groups):
        where = f"batch {i + 1}/{len(run.groups)}"
        bar = tqdm(
            total=opts.steps,
            desc=f"rank {info.rank} {where}" if info.distributed else where,
            unit="step",
            leave=False,
            disable=not progress,
            position=info.rank,
        )
        t0 = time.perf_counter()
        kwargs = request_args(opts, run.height, run.width, run.plan, len(group))
        arr = run.generator.generate(group, on_step=lambda _, bar=bar: bar.update(), **kwargs)  # uint8, on the host
        elapsed = time.perf_counter() - t0
        bar.close()
        report.images += len(group)
        report.calls += calls_per_batch
        report.seconds_total += elapsed
        if i > 0 or len(run.groups) == 1:
            report.seconds += elapsed
            report.steady_calls += calls_per_batch
            report.steady_images += len(group)
        yield group, arr


def write_batch(run: SamplingRun, group: list[int], images: np.ndarray) -> None:
    """One PNG per seed of a batch, each written whole (a rename), so that --resume can trust what it finds."""
    for seed, img in zip(group, images):
        write_png(img, seed_png(run.out, seed))


def run_sampling(opts: SampleOptions, info: distributed.RankInfo | None = None, progress: bool = True) -> SampleReport:
    """Check everything, sample this rank's share of the seeds, write them; returns this rank's report.

    Rank 0 then assembles grid.png (and the npz) from every rank's PNGs.
    """
    info = info or distributed.rank_info()
    run = prepare_run(opts, info)
    with run.generator:
        for group, images in sample_batches(run, progress):
            write_batch(run, group, images)
    distributed.barrier(info)
    if info.is_main:
        run.report.files = assemble(run.out, run.seeds, run.npz)
    return run.report


def merge_reports(reports: list[SampleReport]) -> tuple[SampleReport, float]:
    """One report for all ranks and the mean ms per denoiser call over ranks.

    Images add up; time is the slowest rank's, since the ranks run side by side.
    """
    first = reports[0]
    if len(reports) == 1:
        return first, first.ms_per_call
    merged = SampleReport(
        backend=first.backend,
        why=first.why,
        precision=first.precision,
        device=f"{len(reports)} ranks ({', '.join(r.device for r in reports)})",
        graphs=first.graphs,
        plan_text=first.plan_text,
        files=first.files,
        images=sum(r.images for r in reports),
        skipped_existing=sum(r.skipped_existing for r in reports),
        calls=sum(r.calls for r in reports),
        seconds=max(r.seconds for r in reports),
        seconds_total=max(r.seconds_total for r in reports),
        steady_calls=sum(r.steady_calls for r in reports),
        steady_images=sum(r.steady_images for r in reports),
    )
    per_rank = [r.ms_per_call for r in reports if r.steady_calls]
    return merged, float(np.mean(per_rank)) if per_rank else float("nan")


@click.command()
@click.option(
    "--engine-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory written by lego-export (required unless --backend torch --checkpoint).",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: TensorRT if its engines run here, else ONNX Runtime CUDA, else ONNX Runtime CPU.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Weights for --backend torch [default: the checkpoint recorded in the manifest].",
)
@click.option("--seeds", default="0-15", show_default=True, help="Seeds, e.g. 0-63,100.")
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=None,
    help="Images per batch [default: up to 16, as the engine profile allows].",
)
@click.option("--steps", type=click.IntRange(min=1), default=18, show_default=True)
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True)
@click.option(
    "--S-churn",
    "S_churn",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Stochasticity (EDM S_churn).",
)
@click.option("--S-min", "S_min", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--S-max", "S_max", type=click.FloatRange(min=0), default=math.inf, show_default=True)
@click.option("--S-noise", "S_noise", type=float, default=1.0, show_default=True)
@click.option(
    "--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class index [default: random per seed]."
)
@click.option("--cfg-scale", type=float, default=None, help="Classifier-free guidance scale.")
@click.option("--skip", multiple=True, help="Skip rule BRICKS@FROM:TO (repeatable).")
@click.option("--skip-preset", multiple=True, help="global[@F] or local[@F] (repeatable).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="[default: training resolution]")
@click.option("--width", type=click.IntRange(min=1), default=None, help="[default: training resolution]")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="samples",
    show_default=True,
    help="One PNG per seed and grid.png.",
)
@click.option(
    "--npz",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write all images as uint8 NHWC arr_0 (ADM evaluation format).",
)
@click.option("--resume", is_flag=True, help="Do not sample seeds whose PNG already exists in --out.")
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=True,
    show_default=True,
    help="Replay denoiser calls from CUDA graphs (torch and TensorRT backends on a GPU).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads per process [default: usable cores / processes on this machine].",
)
@click.option(
    "--ort-optimization",
    type=click.Choice(["all", "fusions", "extended", "basic", "disable"]),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimizations; fusions adds the transformers optimizer (slower load, faster calls).",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(quiet: bool, **kwargs) -> None:
    """Sample images with the brick engines of an engine directory (or the torch backend)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    opts = SampleOptions(**kwargs)
    info = distributed.rank_info()
    try:
        distributed.init(info)
        report = run_sampling(opts, info, progress=not quiet)
        merged, ms_per_call = merge_reports(distributed.gather(info, report))
        if info.is_main:
            click.echo(merged.summary(ms_per_call))
            click.echo(f"wrote {merged.images} images to {opts.out}" + (f" and {opts.npz}" if opts.npz else ""))
    except (LegoError, OSError) as err:
        click.echo(f"error: {str(err).splitlines()[0] if str(err) else type(err).__name__}", err=True)
        sys.exit(1)
    finally:
        distributed.shutdown(info)


if __name__ == "__main__":
    main()
