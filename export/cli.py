"""lego-export: per-brick ONNX files and TensorRT engines of a LEGO model, with a verified manifest.

lego-export --engines onnx --out engines/                  # the shipped demo model
lego-export --config lego_S_PG_64 --random-init --out engines/s_pg
lego-export --checkpoint run/network-snapshot.pkl --engines all --precision fp16
lego-export --checkpoint lego_XL_U_32.pkl --vae sd-vae-ft-ema/ --out engines/xl   # latent model + VAE decoder
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from export.errors import ExportError
from export.onnx_export import DEFAULT_OPSET, EXPORTERS
from export.pipeline import ENGINE_CHOICES, ExportOptions, ExportResult, check_target, export_engine_dir
from export.records import PRECISIONS, PROFILE_LIMITS, CheckpointRecord, Profile
from export.specs import DEFAULT_BATCH, parse_range
from export.vae_spec import DEFAULT_VAE_BATCH
from lego_model.cli import OneLineCommand, one_line_errors
from lego_model.configs import LEGO_CONFIGS
from lego_model.errors import LegoError
from lego_model.files import CheckedPath
from lego_model.parsing import BoundedInt
from lego_model.sampler import TORCH_SEED_MAX

if TYPE_CHECKING:
    from lego_model.model import LegoModel

RANGE_HELP = "as MIN:OPT:MAX (or one number)"


@click.command(
    cls=OneLineCommand,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
)
@click.option(
    "--checkpoint",
    type=CheckedPath(dir_okay=False, path_type=Path),
    help="Model to export (.safetensors, authors' .pkl snapshot, or .pt state dict with --config). "
    "Default: the shipped demo model.",
)
@click.option(
    "--config", "config_name", metavar="NAME", help=f"Architecture, e.g. lego_S_PG_64 ({len(LEGO_CONFIGS)} known)."
)
@click.option("--random-init", is_flag=True, help="Export --config with random weights (architecture-only export).")
@click.option(
    "--seed",
    type=BoundedInt(0, TORCH_SEED_MAX),
    default=0,
    show_default=True,
    help="Seed of --random-init weights and test inputs.",
)
@click.option(
    "--engines",
    type=click.Choice(ENGINE_CHOICES),
    default="onnx",
    show_default=True,
    help="onnx: ONNX files; trt: TensorRT plans (needs the gpu extra and a GPU); all: both.",
)
# A plain path: lego-export checks it (and says what is wrong in one line) before loading anything.
@click.option(
    "--out",
    type=CheckedPath(path_type=Path),
    default=Path("engines"),
    show_default=True,
    help="Engine directory to write; checked (its parent writable, --force rules) before anything is loaded.",
)
@click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    default="fp32",
    show_default=True,
    help="Engine precision. fp16/bf16: half-precision files (LayerNorm, softmax, sinusoid in fp32). int8: the bricks "
    "quantized by NNCF (QDQ files, needs the int8 extra), calibrated on the model's own sampling; the embedder stays "
    "fp32. See README for what int8 costs in quality.",
)
@click.option(
    "--batch",
    metavar="MIN:OPT:MAX",
    help=f"Batch range {RANGE_HELP}, MAX <= {PROFILE_LIMITS['batch']}; default {':'.join(map(str, DEFAULT_BATCH))}. "
    "Classifier-free guidance runs conditional and null rows together, doubling the batch: "
    "8 images with guidance need MAX >= 16.",
)
@click.option(
    "--height",
    metavar="MIN:OPT:MAX",
    help=f"Image height range {RANGE_HELP}, multiples of the lcm of the brick sizes, "
    f"MAX <= {PROFILE_LIMITS['height']}; default: smallest legal size : training resolution : 4x training resolution.",
)
@click.option("--width", metavar="MIN:OPT:MAX", help=f"Image width range {RANGE_HELP}; default as --height.")
@click.option(
    "--vae",
    type=CheckedPath(path_type=Path),
    help="Latent models: also export a vae_decoder engine (latents -> 8x images, fp32) from this local diffusers "
    "AutoencoderKL directory or .safetensors file (e.g. sd-vae-ft-ema). Needs the latent extra.",
)
@click.option(
    "--vae-batch",
    metavar="MIN:OPT:MAX",
    help=f"Batch range of the vae_decoder {RANGE_HELP}; default {':'.join(map(str, DEFAULT_VAE_BATCH))} "
    "(images, not doubled by guidance). Its height/width ranges are the bricks'.",
)
@click.option(
    "--opset",
    type=BoundedInt(18, 21),
    default=DEFAULT_OPSET,
    show_default=True,
    help="ONNX opset (18-21: torch's dynamo exporter cannot convert below 18; from 20 the MLP's tanh-GELU is one "
    "Gelu op, which ONNX Runtime runs fused).",
)
@click.option(
    "--exporter",
    type=click.Choice(EXPORTERS),
    default="dynamo",
    show_default=True,
    help="torch.onnx exporter; dynamo falls back to torchscript if it fails.",
)
@click.option(
    "--cache-dir",
    type=CheckedPath(file_okay=False, path_type=Path),
    help="TensorRT timing and engine caches, with --engines trt or all "
    "(default: $LEGO_CACHE_DIR or ~/.cache/lego-deploy).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing engine directory (atomically, at the end; through a symlink, its target). "
    "Only a directory that holds nothing but what a previous lego-export wrote (its manifest lists it).",
)
@click.option("-q", "--quiet", is_flag=True, help="Only the summary table.")
def main(
    checkpoint: Path | None,
    config_name: str | None,
    random_init: bool,
    seed: int,
    engines: str,
    out: Path,
    precision: str,
    batch: str | None,
    height: str | None,
    width: str | None,
    vae: Path | None,
    vae_batch: str | None,
    opset: int,
    exporter: str,
    cache_dir: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    """Export the embedder and every brick of a LEGO model as ONNX (and TensorRT) with dynamic batch,
    height and width, verify each file against the eager model, and write manifest.json.
    With --vae, a latent model also gets a vae_decoder engine, verified against diffusers' eager decoder.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if random_init and checkpoint is not None:
        raise click.UsageError("--random-init exports random weights; leave out --checkpoint")
    if random_init and config_name is None:
        raise click.UsageError("--random-init needs --config NAME (e.g. --config lego_S_PG_64)")
    if config_name is not None and checkpoint is None and not random_init:
        raise click.UsageError("--config without --checkpoint needs --random-init (or pass the --checkpoint)")
    if vae_batch is not None and vae is None:
        raise click.UsageError("--vae-batch sets the batch range of the VAE decoder: pass --vae PATH too")
    if cache_dir is not None and engines == "onnx":
        raise click.UsageError("--cache-dir holds TensorRT's caches: pass --engines trt or all, or leave it out")
    progress = None if quiet else (lambda line: click.echo(line, err=True))
    with _sigterm_unwinds():  # a plain kill cleans up like Ctrl-C: no staging directory stays behind
        with one_line_errors(on_interrupt=lambda: f"nothing was replaced: {out} is as it was before"):
            if engines in ("trt", "all"):
                # Refuse before loading anything heavy or touching --out.
                from export.tensorrt_build import require_tensorrt

                require_tensorrt(engines)
            # Before loading or computing anything; the cache directory only matters to TensorRT builds.
            check_target(out, force, [checkpoint, vae, cache_dir if engines != "onnx" else None])
            model, record = _load_model(checkpoint, config_name, random_init, seed)
            profile = _profile(model.config, batch, height, width)
            decoder = None
            if vae is not None:
                from lego_model.vae import load_vae, require_latent

                require_latent(model.config)
                decoder = load_vae(vae)
                decoder.check_model(model.config)
            options = ExportOptions(
                engines=engines,
                precision=precision,
                profile=profile,
                opset=opset,
                force=force,
                exporter=exporter,
                cache_dir=cache_dir,
                seed=seed,
                vae=decoder,
                vae_batch=DEFAULT_VAE_BATCH
                if vae_batch is None
                else parse_range(vae_batch, "--vae-batch", PROFILE_LIMITS["batch"]),
            )
            result = export_engine_dir(model, out, record, options, progress=progress)
    click.echo(summary_table(result))


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit (unwinding ``finally`` blocks) while inside; the previous handler after."""

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _load_model(
    checkpoint: Path | None, config_name: str | None, random_init: bool, seed: int
) -> tuple[LegoModel, CheckpointRecord]:
    from lego_model.checkpoints import load_checkpoint
    from lego_model.configs import get_config
    from lego_model.model import LegoModel
    from lego_model.shipped import shipped_checkpoint

    if random_init:
        model = LegoModel(get_config(config_name)).randomize_(seed)
        return model.eval(), CheckpointRecord.random_init(seed)
    if checkpoint is None:
        try:
            checkpoint = shipped_checkpoint()
        except LegoError as err:
            raise ExportError(f"{err}; pass --checkpoint PATH or --config NAME --random-init") from None
    model = load_checkpoint(checkpoint, config_name)
    return model, CheckpointRecord.of_file(checkpoint)


def _profile(config, batch: str | None, height: str | None, width: str | None) -> Profile:
    from export.specs import default_profile

    base = default_profile(config)
    given = {"batch": batch, "height": height, "width": width}
    # `is None`, not falsiness: an empty --batch '' is a mistake to refuse, not a request for the default.
    return Profile(
        **{
            axis: getattr(base, axis) if text is None else parse_range(text, f"--{axis}", PROFILE_LIMITS[axis])
            for axis, text in given.items()
        }
    )


def summary_table(result: ExportResult) -> str:
    """Plain-text table: engine, format, precision, size, time, max error against eager."""
    header = ("engine", "format", "precision", "size", "time", "max rel err", "")
    rows = [
        (
            r.name,
            r.format,
            r.precision,
            f"{r.bytes / 1e6:.2f} MB",
            f"{r.seconds:.1f} s",
            f"{r.max_rel:.2e}",
            r.note,
        )
        for r in result.reports
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
    total = sum(r.bytes for r in result.reports)
    lines.append(
        f"{len(result.reports)} engines, {total / 1e6:.2f} MB, {result.seconds:.1f} s -> {result.out} "
        "(max rel err: max|engine - eager| / max|eager| over the verification shapes)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
