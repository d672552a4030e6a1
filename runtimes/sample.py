"""Sample images through an engine directory: ``python -m runtimes.sample --engine-dir engines/``.

One PNG per seed (``000042.png``), ``run.json`` (the settings that decide the
pixels, see :mod:`runtimes.outputs`), a grid of the first 64 seeds, optionally
an npz (uint8 NHWC ``arr_0``, the input format of the ADM evaluation suite the
LEGO authors use), and a summary: backend, precision, CUDA graphs, images/s,
ms per denoiser call, the skip plan and its relative cost.  Same seeds and
plan give the eager model's images (``python -m lego_model.generate``): the
latents and churn noise come from the same per-seed generators.

Latent models (the ``_32`` configs) decode each finished batch into images
(``runtimes.decode``: the manifest's ``vae_decoder`` engine, or diffusers'
eager decoder with ``--vae-backend torch`` / ``--vae PATH``), timed apart from
sampling.  Without a decoder they write their latents instead: one
``000042.npy`` per seed and ``latents.npz`` (float32 NCHW ``arr_0``, ``seeds``).

Under ``torchrun`` every rank samples its share of the seeds on device
LOCAL_RANK; rank 0 writes the npz and the grid after all ranks are done.
Everything that can be refused is refused before the first denoiser call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np
import torch
from tqdm import tqdm

from lego_model.errors import LegoError
from lego_model.flops import check_memory
from lego_model.images import parse_seeds, to_uint8_nhwc
from lego_model.sampler import MAX_STEPS, check_churn, evaluations_per_step
from lego_model.skip import SkipPlan
from lego_model.vae import NO_VAE_HINT
from runtimes import distributed
from runtimes.backends import BACKENDS, Backend, open_backend
from runtimes.backends.ort import check_threads, default_threads
from runtimes.backends.precision import PRECISIONS
from runtimes.decode import VAE_BACKENDS, Decoder, open_decoder
from runtimes.errors import OutputError
from runtimes.generator import Generator
from runtimes.outputs import LATENTS_NPZ, RunOutputs, check_writable, run_settings, weights_identity

log = logging.getLogger(__name__)


@dataclass
class SampleOptions:
    """Every knob of a sampling run (the CLI's options)."""

    engine_dir: str | None = None
    backend: str = "auto"
    checkpoint: str | None = None
    config: str | None = None
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
    vae: str | None = None
    vae_backend: str = "engine"
    precision: str = "auto"


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
    outputs: RunOutputs  # --out, --npz and run.json
    report: SampleReport
    decoder: Decoder | None = None  # latent models: latents -> images after each batch
    wrote: bool = False  # whether this process has written a batch (run.json goes first)

    @property
    def writes_latents(self) -> bool:
        """A latent model without a decoder: its output is latents, not images."""
        return self.generator.config.is_latent and self.decoder is None


def prepare_run(opts: SampleOptions, info: distributed.RankInfo) -> SamplingRun:
    """Every refusal, before any compute: backend, sizes, class, guidance, plan, profiles, output paths."""
    check_writable(Path(opts.out), "--out")  # first: before the backend reads its files
    if opts.threads is not None:
        check_threads(opts.threads)
    threads = opts.threads or default_threads(info.local_world_size)
    backend, why = open_backend(
        opts.backend,
        engine_dir=opts.engine_dir,
        checkpoint=opts.checkpoint,
        config=opts.config,
        local_rank=info.local_rank,
        threads=threads,
        ort_optimization=opts.ort_optimization,
        precision=opts.precision,
    )
    gen = Generator(backend, cuda_graphs=opts.cuda_graphs, why=why)
    cfg = gen.config
    height, width = opts.height or cfg.resolution, opts.width or cfg.resolution
    cfg.check_image_size(height, width)
    cfg.check_class(opts.class_idx)
    cfg.check_guidance(opts.cfg_scale)
    check_churn(opts.S_churn, opts.S_min, opts.S_max, opts.S_noise)
    decoder = _open_decoder(opts, backend, threads)
    if decoder is not None:
        decoder.check(height, width)
    writes_latents = cfg.is_latent and decoder is None
    if writes_latents and opts.npz:
        raise OutputError(f"--npz holds uint8 images, and this latent model has no decoder: {NO_VAE_HINT}")
    seeds = parse_seeds(opts.seeds)
    plan = SkipPlan.from_text(cfg, opts.skip, opts.skip_preset)
    steps = plan.steps(opts.steps)  # refuses a plan that leaves a step without bricks
    batch = opts.batch or gen.max_batch(opts.cfg_scale is not None)
    churn = dict(S_churn=opts.S_churn, S_min=opts.S_min, S_max=opts.S_max, S_noise=opts.S_noise)
    settings = run_settings(
        config=cfg,
        weights=weights_identity(opts.engine_dir, opts.checkpoint),
        precision=backend.precision,
        height=height,
        width=width,
        steps=opts.steps,
        solver=opts.solver,
        class_idx=opts.class_idx,
        cfg_scale=opts.cfg_scale,
        churn=churn,
        active_per_step=steps,
        output="latents" if writes_latents else "images",
    )
    outputs = RunOutputs(
        Path(opts.out), Path(opts.npz) if opts.npz else None, settings, backend.name, latents=writes_latents
    )
    shard = distributed.shard(seeds, info.rank, info.world_size)
    todo = outputs.check(
        shard, resume=opts.resume, height=height, width=width, channels=cfg.img_channels, engine_dir=opts.engine_dir
    )
    skipped = len(shard) - len(todo)
    groups = batches(todo, batch)
    for group in [[0] * batch, *({len(g): g for g in groups}.values())]:  # every batch size a request will have
        gen.check(group, **request_args(opts, height, width, plan, batch))
    if backend.device.type == "cpu" and groups:  # host memory: the torch backend has no profile to bound it
        check_memory(cfg, height, width, max(len(g) for g in groups) * (2 if opts.cfg_scale is not None else 1))
    if backend.device.type == "cpu":
        torch.set_num_threads(threads)
    else:  # CUDA graph capture and the libraries' handles follow the current device
        torch.cuda.set_device(backend.device)
    report = SampleReport(
        backend=backend.name,
        why=why,
        precision=f"{backend.precision} ({backend.precision_why})",
        device=str(backend.device),
        graphs=gen.chain.graphs is not None,
        plan_text=plan.describe(cfg, opts.steps, opts.solver, height, width),
        skipped_existing=skipped,
        decoder=None if decoder is None else decoder.name,
        latent=cfg.is_latent,
    )
    return SamplingRun(opts, info, gen, height, width, plan, seeds, groups, outputs, report, decoder=decoder)


def _open_decoder(opts: SampleOptions, backend: Backend, threads: int) -> Decoder | None:
    """The run's latent decoder (runtimes.decode.open_decoder) from the options and the engine directory."""
    manifest = None
    if opts.engine_dir is not None:
        from export.manifest import load_manifest

        manifest = load_manifest(opts.engine_dir, verify_hashes=False)  # open_backend has checked the hashes
    return open_decoder(
        backend.config,
        backend=backend.name,
        device=backend.device,
        manifest=manifest,
        engine_dir=opts.engine_dir,
        vae_path=opts.vae,
        vae_backend=opts.vae_backend,
        threads=threads,
    )


def request_args(
    opts: SampleOptions, height: int, width: int, plan: SkipPlan, batch: int, latent: bool = False
) -> dict:
    """The ``Generator.generate`` arguments of one batch of this run (all but its seeds).

    A latent model's batch comes back as float64 latents (``output="tensor"``), to be decoded or saved.
    """
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
        output="tensor" if latent else "uint8",
    )


def sample_batches(run: SamplingRun, progress: bool = True) -> Iterator[tuple[list[int], np.ndarray]]:
    """Sample this rank's batches: (seeds, uint8 NHWC images) per batch; timing goes into ``run.report``.

    Each batch is one ``Generator.generate`` request.  A latent model's batch is
    decoded after the sampling clock stops (the decoder has its own); without a
    decoder the batch comes as float32 NCHW latents.  Call it inside ``with
    run.generator`` (and ``run.decoder``).
    """
    opts, info, report, cfg = run.opts, run.info, run.report, run.generator.config
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
        kwargs = request_args(opts, run.height, run.width, run.plan, len(group), latent=cfg.is_latent)
        arr = run.generator.generate(group, on_step=lambda _, bar=bar: bar.update(), **kwargs)
        if cfg.is_latent:
            arr = arr.float().cpu()  # copies to the host: the clock below reads finished work
        elapsed = time.perf_counter() - t0
        bar.close()
        if run.decoder is not None:  # once per batch, outside the sampling loop and its CUDA graphs
            t1 = time.perf_counter()
            arr = to_uint8_nhwc(run.decoder.decode(arr))
            report.decode_seconds += time.perf_counter() - t1
        elif cfg.is_latent:
            arr = arr.numpy()
        report.images += len(group)
        report.calls += calls_per_batch
        report.seconds_total += elapsed
        if i > 0 or len(run.groups) == 1:
            report.seconds += elapsed
            report.steady_calls += calls_per_batch
            report.steady_images += len(group)
        yield group, arr


def write_batch(run: SamplingRun, group: list[int], images: np.ndarray) -> None:
    """One PNG (or latent .npy) per seed of a batch, each written whole (a rename), so that --resume can trust it."""
    run.outputs.write_batch(group, images, first=not run.wrote)
    run.wrote = True


def run_sampling(opts: SampleOptions, info: distributed.RankInfo | None = None, progress: bool = True) -> SampleReport:
    """Check everything, sample this rank's share of the seeds, write them; returns this rank's report.

    Rank 0 then assembles grid.png (and the npz) from every rank's PNGs.
    """
    info = info or distributed.rank_info()
    run = prepare_run(opts, info)
    with run.generator, run.decoder or contextlib.nullcontext():
        for group, images in sample_batches(run, progress):
            write_batch(run, group, images)
    distributed.barrier(info)
    if info.is_main:
        run.report.files = run.outputs.assemble(run.seeds)
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
    help="auto: TensorRT if its engines run here, else ONNX Runtime CUDA, else on the CPU OpenVINO "
    "when installed, else ONNX Runtime CPU.",
)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Weights for --backend torch [default: the checkpoint recorded in the manifest].",
)
@click.option(
    "--config",
    metavar="NAME",
    default=None,
    help="Architecture of a --checkpoint that carries none (a .pt state dict), as in lego-export and generate.",
)
@click.option(
    "--seeds",
    default="0-15",
    show_default=True,
    help="Seeds, e.g. 0-63,100: each once, 0 to 2^32-1, at most 1,000,000 per run.",
)
@click.option(
    "--batch",
    type=click.IntRange(min=1),
    default=None,
    help="Images per batch [default: up to 16, as the engine profile allows].",
)
@click.option("--steps", type=click.IntRange(min=1, max=MAX_STEPS), default=18, show_default=True)
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True)
@click.option(
    "--S-churn",
    "S_churn",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Stochasticity (EDM S_churn); gamma per step is capped at sqrt(2)-1, so values above 0.42*steps act alike.",
)
@click.option("--S-min", "S_min", type=click.FloatRange(min=0), default=0.0, show_default=True)
@click.option("--S-max", "S_max", type=click.FloatRange(min=0), default=math.inf, show_default=True)
@click.option("--S-noise", "S_noise", type=float, default=1.0, show_default=True)
@click.option(
    "--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class index [default: random per seed]."
)
@click.option(
    "--cfg-scale", type=float, default=None, help="Classifier-free guidance scale, 0 to 100 (1 = none) [default: off]."
)
@click.option("--skip", multiple=True, help="Skip rule BRICKS@FROM:TO (repeatable).")
@click.option("--skip-preset", multiple=True, help="global[@F] or local[@F] (repeatable).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="[default: training resolution]")
@click.option("--width", type=click.IntRange(min=1), default=None, help="[default: training resolution]")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="samples",
    show_default=True,
    help="One PNG per seed, grid.png and run.json (the settings; a later run here must use the same).",
)
@click.option(
    "--npz",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write all images as uint8 NHWC arr_0 (ADM evaluation format); never replaces another file.",
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
    help="Replay denoiser calls from CUDA graphs (torch and TensorRT backends on a GPU).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads per process, at most the usable cores [default: usable cores / processes on this machine].",
)
@click.option(
    "--ort-optimization",
    type=click.Choice(["all", "fusions", "extended", "basic", "disable"]),
    default="all",
    show_default=True,
    help="ONNX Runtime graph optimizations; fusions adds the transformers optimizer (slower load, faster calls).",
)
@click.option(
    "--vae",
    type=click.Path(),
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
    "TensorRT run the precision the engines were exported in.",
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
