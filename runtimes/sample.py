"""Sample images: ``python -m runtimes.sample --engine-dir engines/`` (or the eager model, without engines).

One PNG per seed (``000042.png``), ``run.json`` (the settings that decide the
pixels, see :mod:`runtimes.outputs`), a grid of the first 64 seeds (one row
per class with ``--class-rows``), optionally an npz (uint8 NHWC ``arr_0``, the
input format of the ADM evaluation suite the LEGO authors use), and a
summary: backend, precision, CUDA graphs, images/s, ms per denoiser call, the
skip plan and its relative cost.  Without ``--engine-dir`` the eager model
samples (the torch backend: ``--checkpoint``, ``--config NAME --random-init``,
or the shipped model); the same seeds and plan give the same images through
any backend, to the precision's rounding.

Latent models (the ``_32`` configs) decode each finished batch into images
(the manifest's ``vae_decoder`` engine in the backend, or diffusers' eager
decoder with ``--vae-backend torch`` / ``--vae PATH``; see
:mod:`runtimes.backends.decoding`), timed apart from sampling.  Without a decoder they write their latents instead: one
``000042.npy`` per seed and ``latents.npz`` (float32 NCHW ``arr_0``, ``seeds``).

Under ``torchrun`` every rank samples its share of the seeds on device
LOCAL_RANK; rank 0 writes the npz and the grid after all ranks are done.
Everything that can be refused is refused before the first denoiser call.
A run holds its --out and --npz until it ends (rank 0 for all ranks of a
launch): a second run into either is refused naming the first.  Ctrl-C, at
any point, is one line saying how many images were kept and to continue
with --resume.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from tqdm import tqdm

from export.loaders import OPTIMIZATIONS
from lego_model.cli import OneLineCommand, one_line_errors
from lego_model.configs import MAX_CFG_SCALE, MAX_PARAMETERS, MAX_SIDE
from lego_model.files import CheckedPath, shown_path
from lego_model.flops import sampling_flops, usable_cores
from lego_model.images import class_row_seeds, parse_seeds, to_uint8_nhwc
from lego_model.parsing import BoundedFloat, BoundedInt
from lego_model.request import Churn, Request, runs_guided
from lego_model.sampler import MAX_BATCH, MAX_S_NOISE, MAX_STEPS, SOLVERS, evaluations_per_step
from lego_model.skip import SkipPlan
from lego_model.vae import NO_VAE_HINT
from runtimes import distributed
from runtimes.backends import BACKENDS, open_backend
from runtimes.backends.base import default_threads
from runtimes.backends.decoding import VAE_BACKENDS
from runtimes.backends.precision import PRECISIONS
from runtimes.errors import OutputError
from runtimes.generator import Generator
from runtimes.outputs import LATENTS_NPZ, RunOutputs, check_targets, hold_outputs, run_settings

log = logging.getLogger(__name__)


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
    decoder: str | None = None  # latent models: what decoded the latents (None: latents were written)
    latent: bool = False
    decode_seconds: float = 0.0  # not part of seconds / seconds_total

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
        if self.decoder is not None:
            ms = 1000 * self.decode_seconds / self.images if self.images else float("nan")
            lines.append(
                f"decoded latents with {self.decoder} in {self.decode_seconds:.2f} s: {ms:.1f} ms per image "
                "(not included in the sampling time above)"
            )
        elif self.latent:
            lines.append(f"latent model without a VAE: wrote latents (float32 NCHW) to {LATENTS_NPZ}; {NO_VAE_HINT}")
        return "\n".join(lines)


@dataclass
class SamplingRun:
    """A run that passed every check: its generator (loaded by ``with run.generator``) and this rank's work."""

    info: distributed.RankInfo
    generator: Generator
    request: Request  # this rank's seeds still to sample
    seeds: list[int]  # every seed of the run (rank 0 assembles the grid and npz from all of them)
    outputs: RunOutputs  # --out, --npz and run.json
    report: SampleReport
    grid_rows: int | None = None  # --class-rows: one grid row per class
    wrote: bool = False  # whether this process has written a batch (run.json goes first)


def prepare_run(o: dict[str, Any], info: distributed.RankInfo) -> SamplingRun:
    """Every refusal, before any compute: backend, request (sizes, class, guidance, plan), profiles, outputs.

    ``o`` holds the command's options by parameter name (as click passes them).
    The outputs were checked (:func:`runtimes.outputs.check_targets`) and are held (:func:`_held`) by the caller.
    """
    backend, why = open_backend(
        o["backend"],
        engine_dir=o["engine_dir"],
        checkpoint=o["checkpoint"],
        config=o["config"],
        random_init=o["random_init"],
        local_rank=info.local_rank,
        threads=o["threads"],
        ort_optimization=o["ort_optimization"],
        precision=o["precision"],
        vae=o["vae"],
        vae_backend=o["vae_backend"],
    )
    threads = o["threads"] or default_threads(info.local_world_size)
    gen = Generator(backend, cuda_graphs=o["cuda_graphs"], why=why)
    cfg = gen.config
    writes_latents = cfg.is_latent and not backend.has_decoder
    if writes_latents and o["npz"]:
        raise OutputError(f"--npz holds uint8 images, and this latent model has no decoder: {NO_VAE_HINT}")
    request, grid_rows = request_from_options(o, gen, "latents" if writes_latents else "tensor")
    settings = run_settings(
        request,
        weights=backend.weights,
        precision=backend.precision,
        output="latents" if writes_latents else "images",
        backend=None if backend.shares_results else backend.name,  # bf16, int8: the pixels are this backend's own
    )
    outputs = RunOutputs(
        Path(o["out"]), Path(o["npz"]) if o["npz"] else None, settings, backend.name, latents=writes_latents
    )
    shard = distributed.shard(list(request.seeds), info.rank, info.world_size)
    todo = outputs.check(
        shard,
        resume=o["resume"],
        height=request.height,
        width=request.width,
        channels=cfg.img_channels,
        engine_dir=o["engine_dir"],
    )
    mine = request.only(todo)
    gen.check(mine)  # the engines' profiles, the decoder's, and the memory a batch needs
    if backend.device.type == "cpu":
        torch.set_num_threads(threads)
    else:  # CUDA graph capture and the libraries' handles follow the current device
        torch.cuda.set_device(backend.device)
    gflop = sampling_flops(cfg, request.height, request.width, list(request.active), request.solver) / 1e9
    report = SampleReport(
        backend=backend.name,
        why=why,
        precision=f"{backend.precision} ({backend.precision_why})",
        device=str(backend.device),
        graphs=gen.chain.graphs is not None,
        plan_text=f"{request.describe()}\n  cost: {gflop:.3g} GFLOP per image",
        skipped_existing=len(shard) - len(todo),
        decoder=backend.decoder_name(),
        latent=cfg.is_latent,
    )
    return SamplingRun(info, gen, mine, list(request.seeds), outputs, report, grid_rows=grid_rows)


def request_from_options(o: dict[str, Any], gen: Generator, output: str) -> tuple[Request, int | None]:
    """The run's one :class:`Request` from the command's options, and the grid's rows (``--class-rows``: one per
    class, each a batch of its own where the engines' profile takes it)."""
    cfg = gen.config
    seeds = parse_seeds(o["seeds"])
    classes: int | list[int] | None = o["class_idx"]
    batch, grid_rows = o["batch"], None
    if o["class_rows"]:
        rows = class_row_seeds(seeds, cfg.label_dim, o["class_idx"])
        seeds = [s for _, row in rows for s in row]
        classes = [c for c, row in rows for _ in row]
        grid_rows = len(rows)
        if batch is None and len(rows[0][1]) <= gen.max_batch(runs_guided(o["cfg_scale"])):
            batch = len(rows[0][1])
    request = Request.make(
        cfg,
        seeds,
        classes=classes,
        size=(o["height"] or cfg.resolution, o["width"] or cfg.resolution),
        plan=SkipPlan.from_text(cfg, o["skip"], o["skip_preset"]),
        cfg_scale=o["cfg_scale"],
        steps=o["steps"],
        solver=o["solver"],
        churn=Churn(o["S_churn"], o["S_min"], o["S_max"], o["S_noise"]),
        batch=batch,
        output=output,
    )
    return request, grid_rows


def sample_batches(run: SamplingRun, progress: bool = True) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Sample this rank's batches: (seeds, uint8 NHWC images) per batch; timing goes into ``run.report``.

    A latent model's batch is decoded after the sampling clock stops (the
    decoder has its own); without a decoder the batch comes as float32 NCHW
    latents.  Call it inside ``with run.generator``.
    """
    info, report, request = run.info, run.report, run.request
    cfg = request.config
    calls_per_batch = sum(evaluations_per_step(request.steps, request.solver))
    groups = request.batches(run.generator.max_batch(request.guided))
    bar = tqdm(
        total=request.steps * len(groups),
        desc=f"rank {info.rank}: {len(groups)} batches" if info.distributed else f"{len(groups)} batches",
        unit="step",
        leave=False,
        disable=not progress,
        position=info.rank,
    )
    t0 = time.perf_counter()
    gen = run.generator
    for i, (group, x) in enumerate(gen.batches(request, on_step=lambda _: bar.update())):
        x = x.float().cpu() if cfg.is_latent else x.cpu()  # to the host: the clock below reads finished work
        elapsed = time.perf_counter() - t0
        if cfg.is_latent and gen.backend.has_decoder:  # once per batch, outside the sampling loop and its graphs
            t1 = time.perf_counter()
            arr = to_uint8_nhwc(gen.decode(x))
            report.decode_seconds += time.perf_counter() - t1
        elif cfg.is_latent:
            arr = x.numpy()
        else:
            arr = to_uint8_nhwc(x)
        report.images += len(group)
        report.calls += calls_per_batch
        report.seconds_total += elapsed
        if i > 0 or len(groups) == 1:
            report.seconds += elapsed
            report.steady_calls += calls_per_batch
            report.steady_images += len(group)
        yield group, arr
        t0 = time.perf_counter()
    bar.close()


def write_batch(run: SamplingRun, group: Sequence[int], images: np.ndarray) -> None:
    """One PNG (or latent .npy) per seed of a batch, each written whole (a rename), so that --resume can trust it."""
    run.outputs.write_batch(group, images, first=not run.wrote)
    run.wrote = True


def run_sampling(args: Sequence[str], info: distributed.RankInfo | None = None, progress: bool = False) -> SampleReport:
    """Run the command with command-line ``args`` in this process; returns this rank's report (for tests and
    scripts: the options are parsed by the command itself, defaults included)."""
    with main.make_context("runtimes.sample", list(args)) as ctx:
        options = dict(ctx.params)
    options.pop("quiet")
    return _run(options, info or distributed.rank_info(), progress)


def _run(
    options: dict[str, Any], info: distributed.RankInfo, progress: bool, started: list[SamplingRun] | None = None
) -> SampleReport:
    """Check everything, sample this rank's share of the seeds, write them; returns this rank's report.

    The outputs are checked before anything is loaded and held for the whole
    run (:func:`_held`); rank 0 then assembles grid.png (and the npz) from
    every rank's PNGs.  ``started`` receives the run once it is prepared (for
    the message after Ctrl-C).
    """
    out, npz = Path(options["out"]), Path(options["npz"]) if options["npz"] else None
    check_targets(out, npz, options["engine_dir"])  # first: before the backend reads its files or a lock is made
    with _held(out, npz, info):
        run = prepare_run(options, info)
        if started is not None:
            started.append(run)
        with run.generator:
            for group, images in sample_batches(run, progress):
                write_batch(run, group, images)
        distributed.barrier(info)
        if info.is_main:
            run.report.files = run.outputs.assemble(run.seeds, grid_rows=run.grid_rows)
    return run.report


@contextlib.contextmanager
def _held(out: Path, npz: Path | None, info: distributed.RankInfo) -> Iterator[None]:
    """Hold --out and --npz for the block (:func:`runtimes.outputs.hold_outputs`): one holder per launch.

    Rank 0 holds them for every rank of a torchrun launch; the others wait
    for it (it removes what killed runs left before anyone writes) and share
    its refusal, so that every rank stops with the same line.
    """
    with contextlib.ExitStack() as stack:
        refusal = None
        if info.is_main:
            try:
                stack.enter_context(hold_outputs(out, npz))
            except OutputError as err:
                refusal = str(err)
        if info.distributed:
            refusal = distributed.gather(info, refusal)[0]
        if refusal is not None:
            raise OutputError(refusal)
        yield


def kept_message(options: dict[str, Any], started: list[SamplingRun], info: distributed.RankInfo) -> str:
    """What Ctrl-C leaves: how many of the run's images are in --out, and how to continue ("" on ranks but 0:
    rank 0 speaks for the launch, whose ranks share --out)."""
    if not info.is_main:
        return ""
    out = Path(options["out"])
    if not started:
        return f"nothing was written to {shown_path(out)}"
    run = started[0]
    try:
        names = set(os.listdir(out))
    except OSError:
        names = set()
    kept = sum(run.outputs.seed_file(s).name in names for s in run.seeds)
    what = "latents" if run.outputs.latents else "images"
    if kept == 0:
        return f"no {what} were written to {shown_path(out)}; run the command again"
    if kept < len(run.seeds):
        return (
            f"{kept} of {len(run.seeds)} {what} kept in {shown_path(out)}; run the same command with --resume "
            f"to sample the other {len(run.seeds) - kept}"
        )
    rest = "grid.png" if not run.outputs.latents else LATENTS_NPZ
    rest += " and the npz" if run.outputs.npz is not None else ""
    return f"all {kept} {what} kept in {shown_path(out)}; run the same command with --resume to write {rest}"


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
        decoder=first.decoder,
        latent=first.latent,
        decode_seconds=max(r.decode_seconds for r in reports),
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


@click.command(cls=OneLineCommand)
@click.option(
    "--engine-dir",
    type=CheckedPath(file_okay=False),
    default=None,
    help="Directory written by lego-export [default: none, the eager model samples (torch backend)].",
)
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="auto",
    show_default=True,
    help="auto: TensorRT if its engines run here, else ONNX Runtime CUDA, else on the CPU OpenVINO "
    "when installed, else ONNX Runtime CPU; without --engine-dir, torch.",
)
@click.option(
    "--checkpoint",
    type=CheckedPath(dir_okay=False),
    default=None,
    help="Weights for the torch backend (.safetensors, .pkl, .pt) [default: the manifest's checkpoint, "
    "or without --engine-dir the shipped model].",
)
@click.option(
    "--config",
    metavar="NAME",
    default=None,
    help="Architecture of a --checkpoint that carries none (a .pt state dict), or of --random-init.",
)
@click.option("--random-init", is_flag=True, help="Torch backend: random weights (seed 0) of --config NAME.")
@click.option(
    "--seeds",
    default="0-15",
    show_default=True,
    help="Seeds, e.g. 0-63,100: each once, 0 to 2^32-1, at most 1,000,000 per run.",
)
@click.option(
    "--batch",
    type=BoundedInt(1, MAX_BATCH),
    default=None,
    help="Images per batch [default: up to 16, as the engine profile allows].",
)
@click.option("--steps", type=BoundedInt(1, MAX_STEPS), default=18, show_default=True)
@click.option("--solver", type=click.Choice(SOLVERS), default="heun", show_default=True)
@click.option(
    "--S-churn",
    "S_churn",
    type=BoundedFloat(0, math.inf, finite=True),
    default=0.0,
    show_default=True,
    help="Stochasticity (EDM S_churn); gamma per step is capped at sqrt(2)-1, so values above 0.42*steps act alike.",
)
@click.option("--S-min", "S_min", type=BoundedFloat(0, math.inf), default=0.0, show_default=True)
@click.option("--S-max", "S_max", type=BoundedFloat(0, math.inf), default=math.inf, show_default=True)
@click.option(
    "--S-noise",
    "S_noise",
    type=BoundedFloat(0, MAX_S_NOISE),
    default=1.0,
    show_default=True,
    help="Churn noise scale (EDM S_noise; the paper uses 1.0 to 1.007); from 3 on the shipped model draws no digits.",
)
@click.option(
    "--class",
    "class_idx",
    type=BoundedInt(0, MAX_PARAMETERS),
    default=None,
    help="Class index [default: random per seed].",
)
@click.option(
    "--class-rows",
    is_flag=True,
    help="One grid row per class: the seeds dealt out in equal rows, row c of class c (one batch per row).",
)
@click.option(
    "--cfg-scale",
    type=BoundedFloat(0, MAX_CFG_SCALE),
    default=None,
    help="Classifier-free guidance scale (1 = none) [default: off].",
)
@click.option("--skip", multiple=True, help="Skip rule BRICKS@FROM:TO (repeatable).")
@click.option("--skip-preset", multiple=True, help="global[@F] or local[@F] (repeatable).")
@click.option("--height", type=BoundedInt(1, MAX_SIDE), default=None, help="[default: training resolution]")
@click.option("--width", type=BoundedInt(1, MAX_SIDE), default=None, help="[default: training resolution]")
@click.option(
    "--out",
    type=CheckedPath(file_okay=False),
    default="samples",
    show_default=True,
    help="One PNG per seed, grid.png and run.json (the settings; a later run here must use the same). "
    "One run at a time: another run into it is refused while this one runs.",
)
@click.option(
    "--npz",
    type=CheckedPath(dir_okay=False),
    default=None,
    help="Also write all images as uint8 NHWC arr_0 (ADM evaluation format); never replaces another file, "
    "one run at a time.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Do not sample seeds whose PNG already exists in --out (each is decoded first; same settings required).",
)
@click.option(
    "--cuda-graphs/--no-cuda-graphs",
    default=True,
    show_default=True,
    help="Replay each batch's whole sampling run from one CUDA graph (torch and TensorRT backends on a GPU).",
)
@click.option(
    "--threads",
    type=BoundedInt(1, usable_cores()),
    default=None,
    help="CPU threads per process, at most the usable cores [default: usable cores / processes on this machine].",
)
@click.option(
    "--ort-optimization",
    type=click.Choice(OPTIMIZATIONS),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimizations; fusions adds the transformers optimizer (slower load, faster calls).",
)
@click.option(
    "--vae",
    type=CheckedPath(),
    default=None,
    help="Latent models: decode with diffusers' eager AutoencoderKL from this local directory or .safetensors "
    "file (instead of the engine directory's vae_decoder).",
)
@click.option(
    "--vae-backend",
    type=click.Choice(VAE_BACKENDS),
    default="engine",
    show_default=True,
    help="Latent models: engine = the vae_decoder engine of the brick backend's format when the directory has "
    "one; torch = diffusers eager (weights from --vae or the manifest). With neither, latents are written.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="auto",
    show_default=True,
    help="Compute precision of the openvino and torch backends (the files stay fp32). auto: bf16 on OpenVINO "
    "when the CPU has AMX or AVX512-BF16, else fp32; torch runs fp32 unless bf16 is asked. ONNX Runtime and "
    "TensorRT run the precision the engines were exported in. int8: the files of lego-export --precision int8 "
    "(OpenVINO, ONNX Runtime), which auto runs as int8 too.",
)
@click.option("--quiet", is_flag=True, help="No progress bars.")
def main(quiet: bool, **options: Any) -> None:
    """Sample images through the brick engines of an engine directory, or with the eager model (torch backend)."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    started: list[SamplingRun] = []
    info = distributed.RankInfo()
    with one_line_errors(on_interrupt=lambda: kept_message(options, started, info)):
        info = distributed.rank_info()
        try:
            distributed.init(info)
            report = _run(options, info, progress=not quiet, started=started)
            merged, ms_per_call = merge_reports(distributed.gather(info, report))
            if info.is_main:
                click.echo(merged.summary(ms_per_call))
                npz = options["npz"]
                click.echo(f"wrote {merged.images} images to {options['out']}" + (f" and {npz}" if npz else ""))
        finally:
            distributed.shutdown(info)


if __name__ == "__main__":
    main()
