"""Time saved by skip plans against the FLOP-predicted saving, per backend, over whole sampling runs.

Reported per plan: the median over repeated passes of the time saving and of
its ratio to the FLOP saving, with the quartiles and range of that ratio.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from benchmarks.backends import DEVICE, available_backends, denoiser, precision_of
from benchmarks.conftest import SHIPPED
from benchmarks.harness import time_ms
from lego_model import SkipPlan, draw_latents, edm_sample

pytestmark = pytest.mark.benchmark

MODELS = [SHIPPED, "lego_S_PG_64", "lego_S_PR_64"]
# Whole runs per plan and backend.  Single runs of plans that remove a few % of the FLOPs gave saving ratios from
# -2.8 to 3.3 on a loaded 2-core machine: medians and quartiles over repeats say more.
REPEATS = 5
QUALITY_BATCH = 10  # images per sampling batch of the per-backend quality table


def plans(cfg) -> dict[str, SkipPlan]:
    n = cfg.num_bricks
    out = {"full": SkipPlan(n)}
    for k in range(n):
        out[f"skip brick {k}"] = SkipPlan.parse([f"{k}@0:1"], cfg)
    for spec in ("global@0.4", "global@0.6", "local@0.4", "local@0.6"):
        out[spec] = SkipPlan.preset(spec, cfg)
    return out


@pytest.mark.parametrize("name", MODELS)
def test_skip_savings(bench_models, report, name):
    """Each plan's whole-run time (median of REPEATS) against the full stack's, per backend, next to its FLOP saving."""
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    bm = bench_models[name]
    cfg = bm.config
    steps = 18 if name == SHIPPED else 6
    batch = 8 if name == SHIPPED else 1
    h = w = cfg.resolution
    latents, labels, _ = draw_latents(list(range(batch)), cfg.img_channels, h, w, cfg.label_dim)
    latents = latents.to(DEVICE)
    x, sigma = latents * 2.5, torch.full((batch,), 2.5, dtype=torch.float64, device=DEVICE)
    for backend in [b for b in available_backends(bm) if b != "compile"]:
        kw = dict(batch=batch, height=h, width=w, labels=labels, num_steps=steps)
        runs: dict[str, list[float]] = {p: [] for p in plans(cfg)}
        with denoiser(bm, backend, **kw) as fn:
            # Warm-up: one call per active set any plan uses (bindings, graphs), then whole runs, plans
            # interleaved within each repeat so that machine load hits every plan alike.
            for active in {a for plan in plans(cfg).values() for a in plan.steps(steps)}:
                fn(x, sigma, active)
            for _ in range(REPEATS):
                for plan_name, plan in plans(cfg).items():
                    run = functools.partial(
                        edm_sample,
                        fn,
                        latents,
                        num_steps=steps,
                        active_per_step=plan.steps(steps),
                        randn_like=torch.zeros_like,
                    )
                    runs[plan_name].append(time_ms(run, warmup=0, repeats=1)["median_ms"])
        for plan_name, plan in plans(cfg).items():
            predicted = 1 - plan.relative_cost(cfg, steps, "heun", h, w)
            # Saving of each pass against the full stack of the same pass (the plans run back to back).
            savings = [1 - t / f for t, f in zip(runs[plan_name], runs["full"])]
            ratios = [s / predicted for s in savings] if predicted > 0 else [float("nan")]
            q1, q3 = _quartiles(ratios)
            report.add(
                "skipping", model=name, backend=backend, precision=precision_of(backend), plan=plan_name,
                steps=steps, batch=batch, repeats=REPEATS, run_ms=statistics.median(runs[plan_name]),
                flop_saving=predicted, time_saving=statistics.median(savings),
                saving_ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3,
                ratio_min=min(ratios), ratio_max=max(ratios),
            )  # fmt: skip


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def test_quality_vs_cost(bench_models, report):
    """The shipped model's trade-off table: accuracy and Fréchet distance of each plan against its FLOP cost."""
    if SHIPPED not in bench_models:
        pytest.skip("the shipped model is not available")
    from lego_model.digits.classifier import load_classifier, shipped_classifier
    from lego_model.digits.quality import evaluate_plan, real_reference, standard_plans

    model = bench_models[SHIPPED].model.cpu()
    classifier = load_classifier(shipped_classifier())
    per_class = 20
    real_feats, floor = real_reference(classifier, model.config.resolution, per_class)
    report.notes.append(f"Fréchet distance of {per_class} real digits per class to all real digits: {floor:.2f}")
    for name, plan in standard_plans(model.config):
        row = evaluate_plan(model, classifier, real_feats, name, plan, per_class, num_steps=18)
        report.add(
            "quality", model=SHIPPED, plan=name, rule=row.rule, samples=per_class * model.config.label_dim,
            accuracy=row.accuracy, frechet=row.frechet, relative_cost=row.relative_cost,
        )  # fmt: skip


def test_quality_per_backend(bench_models, report):
    """The shipped model's quality per backend and precision: same seeds, full stack and one skip preset.

    What bf16 and int8 cost in quality: accuracy and Fréchet distance next to
    eager fp32's, and the images' mean and max difference from eager fp32's (in
    [-1, 1] units; 2/255 is one uint8 level).  ``int8_auto_bounds`` says whether
    an int8 row is within issue 20's bounds for ``--precision auto`` to pick
    int8: accuracy within 2 points of fp32's and Fréchet distance within 10 %.
    """
    if SHIPPED not in bench_models:
        pytest.skip("the shipped model is not available")
    from lego_model.digits.classifier import load_classifier, shipped_classifier
    from lego_model.digits.quality import real_reference, sample_per_class, score_samples

    bm = bench_models[SHIPPED]
    cfg = bm.config
    classifier = load_classifier(shipped_classifier())
    per_class, steps = 20, 18
    real_feats, _ = real_reference(classifier, cfg.resolution, per_class)
    for plan_name in ("full", "global@0.6"):
        plan = SkipPlan(cfg.num_bricks) if plan_name == "full" else SkipPlan.preset(plan_name, cfg)
        base = None
        for backend in [b for b in available_backends(bm) if b not in ("compile", "torch-graphs")]:
            images, classes = sample_per_class(
                bm.model.cpu(), plan, per_class, num_steps=steps,
                sample=functools.partial(_sample_through, bm, backend, steps),
            )  # fmt: skip
            accuracy, frechet = score_samples(classifier, real_feats, images, classes)
            if base is None:  # eager fp32, the first backend
                base = (images, accuracy, frechet)
            diff = (images.double() - base[0].double()).abs()
            points, ratio = 100 * (accuracy - base[1]), frechet / base[2]
            report.add(
                "quality per backend", model=SHIPPED, backend=backend, precision=precision_of(backend),
                plan=plan_name, samples=per_class * cfg.label_dim, accuracy=accuracy, frechet=frechet,
                accuracy_vs_eager_points=points, frechet_vs_eager=ratio,
                pixel_mean_abs_vs_eager=float(diff.mean()), pixel_max_abs_vs_eager=float(diff.max()),
                int8_auto_bounds=(points >= -2 and ratio <= 1.1) if precision_of(backend) == "int8" else "-",
            )  # fmt: skip


def _sample_through(bm, backend: str, steps: int, seeds: list[int], class_idx: int, plan: SkipPlan) -> torch.Tensor:
    """Images of ``seeds`` of one class through a benchmarked backend, latents drawn as the CLIs draw them."""
    cfg = bm.config
    r = cfg.resolution
    out = []
    for i in range(0, len(seeds), QUALITY_BATCH):  # the engines' profile takes up to 16 rows
        chunk = seeds[i : i + QUALITY_BATCH]  # per-seed generators: chunking keeps every seed's latents
        latents, labels, rnd = draw_latents(chunk, cfg.img_channels, r, r, cfg.label_dim, class_idx)
        kw = dict(batch=len(chunk), height=r, width=r, labels=labels, num_steps=steps)
        with denoiser(bm, backend, **kw) as fn, torch.inference_mode():
            images = edm_sample(
                fn, latents.to(DEVICE), num_steps=steps, active_per_step=plan.steps(steps), randn_like=rnd.randn_like
            )
        out.append(images.cpu())
    return torch.cat(out)
