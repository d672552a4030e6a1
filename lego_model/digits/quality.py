"""Sample quality per skip plan, the paper's trade-off table on our model: ``python -m lego_model.digits.quality``.

For each plan (full stack, every early exit, the global and local presets at a
few break points) we sample N images per class and report

* accuracy: the share of samples the digit classifier assigns to the requested class;
* Fréchet distance between generated and real digits in the classifier's
  64-d feature space (FID's formula, Heusel et al. 2017, with our classifier in
  Inception's place; lower is better, and comparable only within one N);
* the plan's FLOPs relative to the full stack (:meth:`SkipPlan.relative_cost`).

Real features come from all 1,797 scikit-learn digits (the ``data`` extra).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import click
import torch
from torch import Tensor

from lego_model.checkpoints import load_checkpoint
from lego_model.cli import OneLineCommand, one_line_errors
from lego_model.configs import MAX_CFG_SCALE, LegoConfig, refuse_unconditional
from lego_model.digits.classifier import DigitClassifier, load_classifier, predict, shipped_classifier
from lego_model.errors import LegoError
from lego_model.files import CheckedPath, write_atomic
from lego_model.flops import usable_cores
from lego_model.model import LegoModel
from lego_model.parsing import BoundedFloat, BoundedInt
from lego_model.sampler import MAX_STEPS
from lego_model.skip import SkipPlan

log = logging.getLogger(__name__)

# (seeds, class index, plan) -> images (N, C, H, W) in [-1, 1]: another sampling path (a runtime backend) for the
# same seeds; the eager model's sampler when not given.
Sampler = Callable[[list[int], int, SkipPlan], Tensor]

GLOBAL_POINTS = (0.4, 0.6, 0.8)
LOCAL_POINTS = (0.2, 0.4, 0.6)


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), in float64."""
    f = features.to(torch.float64)
    mu = f.mean(dim=0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrtm_psd(a: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix via its eigendecomposition."""
    vals, vecs = torch.linalg.eigh(a)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (N, D).

    tr((S_a S_b)^(1/2)) is computed as tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), whose
    argument is symmetric PSD, so no general (complex) matrix square root is needed.
    """
    mu_a, cov_a = feature_stats(features_a)
    mu_b, cov_b = feature_stats(features_b)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(value.clamp(min=0))


def standard_plans(config: LegoConfig) -> list[tuple[str, SkipPlan]]:
    """Full stack, every early exit (trailing bricks skipped at every step), and the two presets."""
    K = config.num_bricks
    plans = [("full stack", SkipPlan(K))]
    for k in range(K - 1):
        trailing = ",".join(str(j) for j in range(k + 1, K))
        plans.append((f"exit after brick {k}", SkipPlan.parse([f"{trailing}@0:1"], config)))
    if config.global_bricks != config.local_bricks:
        plans += [(f"global@{p:g}", SkipPlan.preset(f"global@{p:g}", config)) for p in GLOBAL_POINTS]
        plans += [(f"local@{p:g}", SkipPlan.preset(f"local@{p:g}", config)) for p in LOCAL_POINTS]
    return plans


@dataclass
class PlanQuality:
    """One row of the trade-off table."""

    plan: str
    rule: str
    accuracy: float
    frechet: float
    relative_cost: float
    seconds: float


def sample_per_class(
    model: LegoModel,
    plan: SkipPlan,
    per_class: int,
    *,
    num_steps: int = 18,
    solver: str = "heun",
    cfg_scale: float | None = None,
    seed_base: int = 0,
    sample: Sampler | None = None,
) -> tuple[Tensor, Tensor]:
    """``per_class`` samples of every class: (images (N, C, H, W) float32 in [-1, 1], requested classes (N,)).

    Class c uses seeds seed_base + c * per_class + i, so every plan (and every
    ``sample`` path) sees the same latents.
    """
    from lego_model.eager import sample_images

    cfg = model.config
    refuse_unconditional(cfg.name, cfg.label_dim, "the per-class quality measure")
    images, classes = [], []
    for c in range(cfg.label_dim):
        seeds = list(range(seed_base + c * per_class, seed_base + (c + 1) * per_class))
        if sample is not None:
            x = sample(seeds, c, plan)
        else:
            x = sample_images(model, seeds, classes=c, plan=plan, cfg_scale=cfg_scale, steps=num_steps, solver=solver)
        images.append(x.clamp(-1, 1).float())
        classes.append(torch.full((per_class,), c))
    return torch.cat(images), torch.cat(classes)


def evaluate_plan(
    model: LegoModel,
    classifier: DigitClassifier,
    real_features: Tensor,
    name: str,
    plan: SkipPlan,
    per_class: int,
    *,
    num_steps: int = 18,
    solver: str = "heun",
    cfg_scale: float | None = None,
    sample: Sampler | None = None,
) -> PlanQuality:
    """Sample with ``plan`` (through ``sample`` when given, else eagerly) and score the samples against the real
    features."""
    cfg = model.config
    t0 = time.perf_counter()
    images, classes = sample_per_class(
        model, plan, per_class, num_steps=num_steps, solver=solver, cfg_scale=cfg_scale, sample=sample
    )
    seconds = time.perf_counter() - t0
    accuracy, frechet = score_samples(classifier, real_features, images, classes)
    return PlanQuality(
        plan=name,
        rule=str(plan),
        accuracy=accuracy,
        frechet=frechet,
        relative_cost=plan.relative_cost(cfg, num_steps, solver, cfg.resolution, cfg.resolution),
        seconds=seconds,
    )


def score_samples(
    classifier: DigitClassifier, real_features: Tensor, images: Tensor, classes: Tensor
) -> tuple[float, float]:
    """(accuracy, Fréchet distance) of samples (N, C, H, W) in [-1, 1] drawn for ``classes`` (N,)."""
    pred, feats = predict(classifier, images)
    return float((pred == classes).float().mean()), frechet_distance(feats, real_features)


def markdown_table(rows: list[PlanQuality]) -> str:
    lines = [
        "| plan | bricks skipped | accuracy | Fréchet distance | relative FLOPs |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r.plan} | {r.rule} | {r.accuracy:.1%} | {r.frechet:.2f} | {r.relative_cost:.3f} |")
    return "\n".join(lines)


def real_reference(classifier: DigitClassifier, resolution: int, per_class: int) -> tuple[Tensor, float]:
    """Features of all real digits, and the Fréchet distance of ``per_class`` real digits of every class
    (a fixed random draw) to all of them: what a generator that reproduced the data would score at this N."""
    from lego_model.digits.data import load_digits_dataset

    images, onehot = load_digits_dataset(resolution)
    _, feats = predict(classifier, images)
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    targets = onehot.argmax(dim=1)[perm]
    subset = torch.cat([perm[targets == c][:per_class] for c in range(onehot.shape[1])])
    return feats, frechet_distance(feats[subset], feats)


@click.command(cls=OneLineCommand)
@click.option("--checkpoint", type=CheckedPath(dir_okay=False), default=None, help="[default: the shipped model]")
@click.option(
    "--classifier",
    "classifier_path",
    type=CheckedPath(dir_okay=False),
    default=None,
    help="[default: the shipped classifier]",
)
# 10,000 per class is 100,000 images per plan: far more than a table needs (the real digits have ~180 per class).
@click.option(
    "--per-class", type=BoundedInt(2, 10_000), default=50, show_default=True, help="Samples per class and plan."
)
@click.option("--steps", type=BoundedInt(1, MAX_STEPS), default=18, show_default=True)
@click.option("--solver", type=click.Choice(["heun", "euler"]), default="heun", show_default=True)
@click.option(
    "--cfg-scale",
    type=BoundedFloat(0, MAX_CFG_SCALE),
    default=None,
    help=f"Classifier-free guidance scale, 0 to {MAX_CFG_SCALE:g} [default: none].",
)
@click.option("--plan", "plan_names", multiple=True, help="Only these rows (e.g. 'full stack', 'global@0.6').")
@click.option("--json", "json_out", type=CheckedPath(dir_okay=False), default=None, help="Also write the rows as JSON.")
@click.option("--threads", type=BoundedInt(1, usable_cores()), default=None, help="torch CPU threads.")
def main(checkpoint, classifier_path, per_class, steps, solver, cfg_scale, plan_names, json_out, threads):
    """Accuracy, Fréchet distance and relative FLOPs of the full stack, every early exit and the skip presets."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        from lego_model.shipped import shipped_checkpoint

        if threads:
            torch.set_num_threads(threads)
        model = load_checkpoint(checkpoint or shipped_checkpoint())
        classifier = load_classifier(classifier_path or shipped_classifier())
        real_feats, floor = real_reference(classifier, model.config.resolution, per_class)
        plans = standard_plans(model.config)
        if plan_names:
            known = {name for name, _ in plans}
            unknown = [p for p in plan_names if p not in known]
            if unknown:
                raise LegoError(f"unknown plan(s) {unknown}; choose from {sorted(known)}")
            plans = [(n, p) for n, p in plans if n in plan_names]
        rows = []
        for name, plan in plans:
            row = evaluate_plan(
                model,
                classifier,
                real_feats,
                name,
                plan,
                per_class,
                num_steps=steps,
                solver=solver,
                cfg_scale=cfg_scale,
            )
            log.info(
                "%-20s acc %.3f  FD %.2f  cost %.3f  (%.0f s)",
                name,
                row.accuracy,
                row.frechet,
                row.relative_cost,
                row.seconds,
            )
            rows.append(row)
        guidance = f"guidance {cfg_scale:g}" if cfg_scale is not None else "no guidance"
        click.echo(f"\n{model.config.name}: {per_class} samples per class, {steps} {solver} steps, {guidance}")
        click.echo(markdown_table(rows))
        click.echo(f"Fréchet distance of {per_class} real digits per class to all real digits: {floor:.2f}")
        if json_out:
            payload = {
                "config": model.config.name,
                "per_class": per_class,
                "steps": steps,
                "solver": solver,
                "cfg_scale": cfg_scale,
                "real_floor": floor,
                "rows": [asdict(r) for r in rows],
            }
            write_atomic(json_out, json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
