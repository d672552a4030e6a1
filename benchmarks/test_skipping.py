"""Time saved by skip plans against the FLOP-predicted saving, per backend, over whole sampling runs."""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from benchmarks.backends import DEVICE, available_backends, denoiser
from benchmarks.conftest import SHIPPED
from benchmarks.harness import time_ms
from lego_model import SkipPlan, draw_latents, edm_sample

pytestmark = pytest.mark.benchmark

MODELS = [SHIPPED, "lego_S_PG_64", "lego_S_PR_64"]
REPEATS = 3  # whole runs per plan and backend; the median is reported


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
    for backend in [b for b in available_backends() if b != "compile"]:
        kw = dict(batch=batch, height=h, width=w, labels=labels, num_steps=steps)
        with denoiser(bm, backend, **kw) as fn:
            # Warm-up: one call per active set any plan uses (bindings, graphs), then whole runs, plans
            # interleaved within each repeat so that machine load hits every plan alike.
            for active in {a for plan in plans(cfg).values() for a in plan.steps(steps)}:
                fn(x, sigma, active)
            samples: dict[str, list[float]] = {}
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
                    stats = time_ms(run, warmup=0, repeats=1)
                    samples.setdefault(plan_name, []).append(stats["median_ms"])
        times = {plan_name: statistics.median(ms) for plan_name, ms in samples.items()}
        for plan_name, plan in plans(cfg).items():
            predicted = 1 - plan.relative_cost(cfg, steps, "heun", h, w)
            measured = 1 - times[plan_name] / times["full"]
            report.add(
                "skipping", model=name, backend=backend, plan=plan_name, steps=steps, batch=batch,
                run_ms=times[plan_name], repeats=REPEATS, flop_saving=predicted, time_saving=measured,
                saving_ratio=(measured / predicted) if predicted > 0 else float("nan"),
            )  # fmt: skip


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
