"""Training a LEGO model with the paper's joint objective: ``python -m lego_model.digits.train``.

The objective (Zheng et al. 2024, Sec. 3; the authors' LEGOEDMLoss) is the EDM
denoising loss (Karras et al. 2022, Sec. 5: log-normal sigma with P_mean -1.2,
P_std 1.2, weight (s^2 + sd^2) / (s * sd)^2) applied to the output D of every
brick prefix 0..k and averaged over k, so that every early exit is itself a
trained denoiser and skipping bricks at sampling time is meaningful.  Because
brick k only adds to the chain, one pass through the bricks gives every
prefix's D: we form D after each brick instead of re-running prefixes.

Checkpoints: the model file (``--out``) holds the EMA weights in our
safetensors format, loadable with :func:`lego_model.checkpoints.load_checkpoint`.
A separate state file beside it holds what resuming needs (raw weights, EMA,
AdamW moments, step, RNG state); both are written atomically, every
``--save-every`` steps and when the run is interrupted (Ctrl-C or SIGTERM),
so an interruption loses no finished step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import torch
from click.core import ParameterSource
from torch import Tensor

from lego_model.checkpoints import read_safetensors, save_checkpoint, write_safetensors
from lego_model.cli import OneLineCommand, one_line_errors
from lego_model.configs import LegoConfig, get_config
from lego_model.errors import CheckpointError, LegoError
from lego_model.files import CheckedPath
from lego_model.flops import usable_cores
from lego_model.model import LegoModel
from lego_model.parsing import BoundedFloat, BoundedInt, parse_float, parse_int
from lego_model.precond import combine_output, prepare_inputs
from lego_model.sampler import TORCH_SEED_MAX

log = logging.getLogger(__name__)

STATE_FORMAT = "lego-train-state/1"
# Bounds of the command line: far above the shipped run (4,000 steps of batch 64 on 1,797 digits), far below what
# would only fail after hours (a batch of 10^6 16x16 canvases, a schedule of 10^12 steps).
MAX_TRAIN_STEPS = 10_000_000
MAX_BATCH = 4096
MAX_WALL_TIME_S = 1e12  # seconds of training recorded in a state file (30,000 years)


@dataclass(frozen=True)
class TrainOptions:
    """Everything that decides a training run besides the architecture and the data."""

    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    ema_decay: float = 0.999
    p_mean: float = -1.2
    p_std: float = 1.2
    grad_clip: float = 1.0
    seed: int = 0


# --------------------------------------------------------------------------- objective


def sample_sigma(n: int, p_mean: float, p_std: float, generator: torch.Generator) -> Tensor:
    """Log-normal noise levels ln(sigma) ~ N(P_mean, P_std^2) (EDM, Table 1, training), shape [n]."""
    return (torch.randn(n, generator=generator) * p_std + p_mean).exp()


def drop_labels(labels: Tensor, prob: float, generator: torch.Generator) -> Tensor:
    """Replace each row by the null label (all zeros) with probability ``prob``, for classifier-free guidance."""
    keep = torch.rand(labels.shape[0], 1, generator=generator) >= prob  # (B, 1)
    return labels * keep.to(labels.dtype)


def prefix_losses(model: LegoModel, images: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor) -> Tensor:
    """EDM-weighted denoising loss of every brick prefix, shape [num_bricks]; entry k is prefix 0..k.

    images: clean y [B, C, H, W]; noise: unit Gaussian like images; sigma: [B].
    One pass through the bricks: D_k = c_skip * x + c_out * f_k, with f_k the
    chain's output after brick k (shared/DESIGN.md, "One denoiser call").
    """
    cfg = model.config
    sd = cfg.sigma_data
    s = sigma.reshape(-1, 1, 1, 1)
    weight = (s**2 + sd**2) / (s * sd) ** 2  # (B, 1, 1, 1): EDM lambda(sigma)
    x = images + noise * s  # (B, C, H, W)
    inputs = prepare_inputs(x, sigma, sigma_data=sd, guided=False)  # x_in (B, C+2, H, W), c_noise (B,)
    cond = model.embed(inputs.c_noise, labels)  # (B, D)
    losses = []
    f = None
    for brick in model.bricks:
        f = brick(inputs.x_in, f, cond)  # (B, C, H, W)
        D = combine_output(inputs, f)  # (B, C, H, W): the early exit after this brick
        losses.append((weight * (D - images) ** 2).mean())
    return torch.stack(losses)  # (K,)


def joint_loss(model: LegoModel, images: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor) -> Tensor:
    """The paper's objective: the mean over brick prefixes of the EDM loss (a scalar)."""
    return prefix_losses(model, images, labels, sigma, noise).mean()


# --------------------------------------------------------------------------- EMA and schedule


def ema_decay_at(step: int, max_decay: float) -> float:
    """EMA decay after ``step`` finished steps: ramps up as (1 + step) / (10 + step) so early weights fade fast."""
    return min(max_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: LegoModel, model: LegoModel, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (buffers are copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def lr_at(step: int, opts: TrainOptions) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < opts.warmup_steps:
        return opts.lr * (step + 1) / opts.warmup_steps
    progress = (step - opts.warmup_steps) / max(1, opts.steps - opts.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return opts.lr * (opts.min_lr_ratio + (1 - opts.min_lr_ratio) * cosine)


# --------------------------------------------------------------------------- state files


@dataclass
class TrainState:
    """A training run between two steps: everything needed to continue it bit for bit."""

    config: LegoConfig
    opts: TrainOptions
    model: LegoModel
    ema: LegoModel
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0
    wall_time_s: float = 0.0


def new_state(config: LegoConfig, opts: TrainOptions) -> TrainState:
    """Fresh run: the authors' initialisation from ``opts.seed``, EMA = initial weights."""
    torch.manual_seed(opts.seed)
    model = LegoModel(config).train()  # reset_parameters: xavier, adaLN-Zero, N(0, 0.02) embedders
    ema = LegoModel(config).eval().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, betas=(0.9, 0.999), weight_decay=opts.weight_decay)
    generator = torch.Generator().manual_seed(opts.seed)
    return TrainState(config, opts, model, ema, optimizer, generator)


def save_state(state: TrainState, path: str | Path) -> Path:
    """Write the resume file atomically (temporary name, then rename)."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for k, v in state.model.state_dict().items():
        tensors[f"model/{k}"] = v.detach().contiguous()
    for k, v in state.ema.state_dict().items():
        tensors[f"ema/{k}"] = v.detach().contiguous()
    opt = state.optimizer.state_dict()
    for idx, slots in opt["state"].items():
        for name, value in slots.items():
            tensors[f"optim/{idx}/{name}"] = torch.as_tensor(value).contiguous()
    tensors["rng/generator"] = state.generator.get_state()
    meta = {
        "format": STATE_FORMAT,
        "lego_config": state.config.to_json(),
        "train_options": json.dumps(asdict(state.opts), sort_keys=True),
        "param_groups": json.dumps(opt["param_groups"]),
        "step": str(state.step),
        "wall_time_s": repr(state.wall_time_s),
    }
    return write_safetensors(tensors, path, meta)


def load_state(path: str | Path, opts: TrainOptions | None = None) -> TrainState:
    """Read a resume file; ``opts`` (e.g. more steps) replaces the stored options when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}: start without --resume, or point --state at the file")
    meta, tensors = read_safetensors(path, "training state")
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{path} is not a training state written by lego_model.digits.train (format {meta.get('format')!r})"
        )
    config = LegoConfig.from_dict(json.loads(meta["lego_config"]))
    stored = TrainOptions(**json.loads(meta["train_options"]))
    state = new_state(config, opts or stored)
    state.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})
    state.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema/")})
    slots: dict[int, dict[str, Tensor]] = {}
    n_slots = len(list(state.model.parameters()))
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            slots.setdefault(parse_int(idx, f"{path}: optimizer slot", 0, n_slots - 1), {})[name] = value
    slots = dict(sorted(slots.items()))  # file order is lexical ("10" before "2")
    state.optimizer.load_state_dict({"state": slots, "param_groups": json.loads(meta["param_groups"])})
    state.generator.set_state(tensors["rng/generator"])
    state.step = parse_int(meta.get("step"), f"{path}: step", 0, MAX_TRAIN_STEPS)
    state.wall_time_s = parse_float(meta.get("wall_time_s"), f"{path}: wall_time_s", 0.0, MAX_WALL_TIME_S)
    return state


# --------------------------------------------------------------------------- loop


def train_step(state: TrainState, images: Tensor, labels: Tensor | None) -> Tensor:
    """One optimizer step on a random batch; returns the per-prefix losses [K] (detached)."""
    opts, gen = state.opts, state.generator
    idx = torch.randint(images.shape[0], (opts.batch_size,), generator=gen)
    y = images[idx]  # (B, C, H, W)
    lab = None
    if labels is not None:
        lab = drop_labels(labels[idx], state.config.class_dropout_prob, gen)  # (B, label_dim)
    sigma = sample_sigma(opts.batch_size, opts.p_mean, opts.p_std, gen)  # (B,)
    noise = torch.randn(y.shape, generator=gen)  # (B, C, H, W)
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(state.step, opts)
    per_prefix = prefix_losses(state.model, y, lab, sigma, noise)
    state.optimizer.zero_grad(set_to_none=True)
    per_prefix.mean().backward()
    if opts.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), opts.grad_clip)
    state.optimizer.step()
    state.step += 1
    ema_update(state.ema, state.model, ema_decay_at(state.step, opts.ema_decay))
    return per_prefix.detach()


@contextmanager
def _stop_flag() -> Iterator[dict[str, bool]]:
    """SIGINT/SIGTERM set a flag that the loop reads between steps, so a step is never cut in half."""
    flag = {"stop": False}

    def handler(signum, frame):
        flag["stop"] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def save_model(state: TrainState, out: str | Path, data_name: str) -> Path:
    """The EMA weights as a loadable checkpoint, with the run's provenance in the metadata."""
    meta = {
        "weights": "ema",
        "train_steps": str(state.step),
        "train_wall_time_s": f"{state.wall_time_s:.1f}",
        "train_options": json.dumps(asdict(state.opts), sort_keys=True),
        "train_data": data_name,
    }
    return save_checkpoint(state.ema, out, meta)


def train(
    state: TrainState,
    images: Tensor,
    labels: Tensor | None,
    *,
    out: str | Path,
    state_path: str | Path,
    save_every: int = 250,
    data_name: str = "",
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainState:
    """Run until ``opts.steps`` (or ``stop_after`` more steps), saving model + state periodically and at the end."""
    from tqdm import tqdm

    opts = state.opts
    target = opts.steps if stop_after is None else min(opts.steps, state.step + stop_after)
    bar = tqdm(total=opts.steps, initial=state.step, disable=not progress, dynamic_ncols=True, mininterval=2.0)
    ema_loss = None
    # The bar closes on errors too: a failed save's one line then starts a line of its own.
    with bar, _stop_flag() as flag:
        last_save = state.step
        t_last = time.perf_counter()
        while state.step < target:
            per_prefix = train_step(state, images, labels)
            now = time.perf_counter()
            state.wall_time_s += now - t_last
            t_last = now
            loss = float(per_prefix.mean())
            ema_loss = loss if ema_loss is None else 0.98 * ema_loss + 0.02 * loss
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.4f}", prefixes=" ".join(f"{v:.3f}" for v in per_prefix.tolist()))
            if state.step % 100 == 0:
                log.info(
                    "step %d loss %.4f prefixes %s lr %.2e",
                    state.step,
                    ema_loss,
                    per_prefix.tolist(),
                    lr_at(state.step, opts),
                )
            if flag["stop"] or state.step - last_save >= save_every or state.step == target:
                save_state(state, state_path)
                save_model(state, out, data_name)
                last_save = state.step
                t_last = time.perf_counter()  # saving time is not training time
            if flag["stop"]:
                log.warning("interrupted after step %d; resume with --resume", state.step)
                break
    return state


def _default_state_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".state.safetensors")


@click.command(cls=OneLineCommand)
@click.option("--config", "config_name", default="digits_pg_16", show_default=True, help="Registry config to train.")
@click.option(
    "--out",
    type=CheckedPath(dir_okay=False),
    required=True,
    help="Model file (EMA weights, .safetensors); a new training refuses one that exists, --resume rewrites its own.",
)
@click.option(
    "--state",
    "state_path",
    type=CheckedPath(dir_okay=False),
    default=None,
    help="Resume file [default: OUT with .state.safetensors].",
)
@click.option("--resume", is_flag=True, help="Continue from the resume file.")
@click.option("--steps", type=BoundedInt(1, MAX_TRAIN_STEPS), default=TrainOptions.steps, show_default=True)
@click.option("--batch-size", type=BoundedInt(1, MAX_BATCH), default=TrainOptions.batch_size, show_default=True)
@click.option("--lr", type=BoundedFloat(0, 1, low_open=True), default=TrainOptions.lr, show_default=True)
@click.option(
    "--warmup-steps", type=BoundedInt(1, MAX_TRAIN_STEPS), default=TrainOptions.warmup_steps, show_default=True
)
@click.option("--ema-decay", type=BoundedFloat(0, 1), default=TrainOptions.ema_decay, show_default=True)
@click.option("--seed", type=BoundedInt(0, TORCH_SEED_MAX), default=TrainOptions.seed, show_default=True)
@click.option("--save-every", type=BoundedInt(1, MAX_TRAIN_STEPS), default=250, show_default=True)
@click.option(
    "--threads",
    type=BoundedInt(1, usable_cores()),
    default=None,
    help="torch CPU threads, at most the usable cores [default: torch's choice].",
)
@click.option(
    "--stop-after",
    type=BoundedInt(1, MAX_TRAIN_STEPS),
    default=None,
    help="Stop after this many steps (resume later).",
)
def main(
    config_name,
    out,
    state_path,
    resume,
    steps,
    batch_size,
    lr,
    warmup_steps,
    ema_decay,
    seed,
    save_every,
    threads,
    stop_after,
):
    """Train a class-conditional LEGO model on scikit-learn's digits (16x16) with the joint prefix objective."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with one_line_errors():
        from lego_model.digits.data import load_digits_dataset

        if threads:
            torch.set_num_threads(threads)
        out_path = Path(out)
        state_file = Path(state_path) if state_path else _default_state_path(out_path)
        given = dict(
            steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, ema_decay=ema_decay, seed=seed
        )
        if resume:
            # Options typed on this command line override the stored ones; the rest continue as they were.
            ctx = click.get_current_context()
            typed = {k: v for k, v in given.items() if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE}
            state = load_state(state_file)
            state.opts = dataclasses.replace(state.opts, **typed)
            if (
                ctx.get_parameter_source("config_name") == ParameterSource.COMMANDLINE
                and state.config.name != config_name
            ):
                raise LegoError(f"{state_file} trains {state.config.name}, not {config_name}: leave out --config")
            log.info("resuming %s at step %d", state_file, state.step)
        else:
            if state_file.exists():
                raise LegoError(f"{state_file} exists: pass --resume to continue it, or delete it to start over")
            if out_path.exists() or out_path.is_symlink():  # a model (or any file) of the user's: never replaced
                raise LegoError(f"--out {out_path} exists: choose another --out, or delete it to train a new model")
            state = new_state(get_config(config_name), TrainOptions(**given))
        cfg = state.config
        images, labels = load_digits_dataset(cfg.resolution)
        if cfg.img_channels != images.shape[1] or cfg.label_dim not in (0, labels.shape[1]):
            raise LegoError(f"{cfg.name} does not fit the digits data (1 channel, 10 classes)")
        n_params = sum(p.numel() for p in state.model.parameters())
        opts = state.opts
        log.info(
            "%s: %d parameters, %d images, %d steps of batch %d",
            cfg.name,
            n_params,
            len(images),
            opts.steps,
            opts.batch_size,
        )
        out_path.parent.mkdir(parents=True, exist_ok=True)
        train(
            state,
            images,
            labels if cfg.label_dim else None,
            out=out_path,
            state_path=state_file,
            save_every=save_every,
            data_name=f"sklearn digits {cfg.resolution}x{cfg.resolution}",
            stop_after=stop_after,
        )
        log.info("done: step %d, %.0f s of training; model in %s", state.step, state.wall_time_s, out_path)


if __name__ == "__main__":
    main()
