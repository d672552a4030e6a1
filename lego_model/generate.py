"""Eager sampling of a LEGO model to PNG files: ``python -m lego_model.generate``.

The reference path that every engine backend is compared with.  Latent
models (the ``_32`` configs) decode their samples with ``--vae PATH`` (a local
diffusers AutoencoderKL, see :mod:`lego_model.vae`); without it they write the
latents to ``latents.npz`` (float32 NCHW ``arr_0``, ``seeds``).  Every
refusal (options, output directory, a batch whose activations cannot fit in
memory) comes before the first denoiser call; a run that produces NaN/Inf is
refused after sampling and writes nothing.  The output directory is created
only when the results are written.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from lego_model.checkpoints import load_checkpoint
from lego_model.configs import get_config
from lego_model.eager import sample_images
from lego_model.errors import LegoError
from lego_model.files import check_writable
from lego_model.flops import check_memory, sampling_flops
from lego_model.images import class_row_seeds, make_grid, parse_seeds, save_image, to_uint8_nhwc
from lego_model.model import LegoModel
from lego_model.sampler import MAX_STEPS
from lego_model.shipped import shipped_checkpoint
from lego_model.skip import SkipPlan

log = logging.getLogger(__name__)


@click.command()
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    default=None,
    help="Checkpoint (.safetensors, .pkl, .pt); default: the shipped model.",
)
@click.option("--config", "config_name", default=None, help="Registry config for .pt files, or with --random-init.")
@click.option("--random-init", is_flag=True, help="Random weights of --config instead of a checkpoint.")
@click.option(
    "--seeds",
    default="0-15",
    show_default=True,
    help="Seeds, e.g. 0-63,100: each once, 0 to 2^32-1, at most 1,000,000 per run.",
)
@click.option("--steps", type=click.IntRange(min=1, max=MAX_STEPS), default=18, show_default=True)
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True)
@click.option("--class", "class_idx", type=click.IntRange(min=0), default=None, help="Class index [default: random].")
@click.option(
    "--class-rows", is_flag=True, help="One grid row per class: seeds dealt out in equal rows, row c of class c."
)
@click.option(
    "--cfg-scale", type=float, default=None, help="Classifier-free guidance scale, 0 to 100 (1 = none) [default: off]."
)
@click.option("--skip", multiple=True, help="Skip rule BRICKS@FROM:TO (repeatable).")
@click.option("--skip-preset", multiple=True, help="global[@F] or local[@F] (repeatable).")
@click.option("--height", type=click.IntRange(min=1), default=None, help="[default: training resolution]")
@click.option("--width", type=click.IntRange(min=1), default=None, help="[default: training resolution]")
@click.option("--out", type=click.Path(file_okay=False), default="samples", show_default=True)
@click.option(
    "--vae",
    type=click.Path(),
    default=None,
    help="Latent models: decode with this local diffusers AutoencoderKL directory or .safetensors file "
    "[default: write latents.npz].",
)
def main(
    checkpoint,
    config_name,
    random_init,
    seeds,
    steps,
    solver,
    class_idx,
    class_rows,
    cfg_scale,
    skip,
    skip_preset,
    height,
    width,
    out,
    vae,
):
    """Sample images with the eager PyTorch model and write one PNG per seed plus grid.png
    (latent models: with --vae, else latents.npz).

    All seeds (of a --class-rows row) run as one batch: the run prints its cost
    and refuses a batch whose activations exceed the available memory.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out_dir = Path(out)
        check_writable(out_dir, "--out")  # before anything is loaded or sampled
        if random_init:
            if not config_name:
                raise LegoError("--random-init needs --config NAME")
            model = LegoModel(get_config(config_name)).randomize_(0).eval()
        else:
            model = load_checkpoint(checkpoint or shipped_checkpoint(), config_name)
        cfg = model.config
        height, width = height or cfg.resolution, width or cfg.resolution
        cfg.check_image_size(height, width)
        cfg.check_class(class_idx)
        cfg.check_guidance(cfg_scale)
        decoder = None
        if vae is not None:
            from lego_model.vae import load_vae, require_latent

            require_latent(cfg)
            decoder = load_vae(vae)
            decoder.check_model(cfg)  # refuses pixel models and other latent channels before sampling
        seed_list = parse_seeds(seeds)
        plan = SkipPlan.from_text(cfg, skip, skip_preset)
        rows = class_row_seeds(seed_list, cfg.label_dim, class_idx) if class_rows else [(class_idx, seed_list)]
        batch = max(len(row_seeds) for _, row_seeds in rows) * (2 if cfg_scale is not None else 1)
        need = check_memory(cfg, height, width, batch)
        click.echo(plan.describe(cfg, steps, solver, height, width))
        gflop = sampling_flops(cfg, height, width, plan.steps(steps), solver) / 1e9
        click.echo(
            f"  cost: {gflop:.3g} GFLOP per image, {gflop * len(seed_list):.3g} GFLOP in all; "
            f"activations at least {need / 2**30:.2g} GiB (batch of {batch})"
        )
        t0 = time.perf_counter()
        images = torch.cat(
            [
                sample_images(
                    model,
                    row_seeds,
                    height=height,
                    width=width,
                    num_steps=steps,
                    solver=solver,
                    class_idx=row_class,
                    cfg_scale=cfg_scale,
                    plan=plan,
                )
                for row_class, row_seeds in rows
            ]
        )
        elapsed = time.perf_counter() - t0
        if cfg.is_latent and decoder is None:
            from lego_model.vae import NO_VAE_HINT

            latents = images.float().numpy()  # (N, C, h, w)
            out_dir.mkdir(parents=True, exist_ok=True)
            np.savez(out_dir / "latents.npz", arr_0=latents, seeds=np.asarray(seed_list, dtype=np.int64))
            click.echo(f"wrote {len(seed_list)} latents to {out_dir / 'latents.npz'} in {elapsed:.1f} s")
            click.echo(f"latent model without a VAE: {NO_VAE_HINT}")
            return
        if decoder is not None:
            t1 = time.perf_counter()
            images = decoder.decode(images.float())
            click.echo(f"decoded {len(images)} latents in {time.perf_counter() - t1:.1f} s")
        arr = to_uint8_nhwc(images)
        out_dir.mkdir(parents=True, exist_ok=True)
        for seed, img in zip(seed_list, arr):
            save_image(img, out_dir / f"{seed:06d}.png")
        save_image(make_grid(arr, rows=len(rows) if class_rows else None), out_dir / "grid.png")
        click.echo(f"wrote {len(seed_list)} images and grid.png to {out_dir} in {elapsed:.1f} s")
    except (LegoError, OSError) as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
