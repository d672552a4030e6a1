"""Time saved by skip plans against the FLOP-predicted saving, per backend, over whole runs and per call.

Each plan's whole sampling run is timed next to a run of the full stack, the
two alternately first (:func:`benchmarks.harness.interleaved_ms`), and its
saving is taken against that neighbour, so the shared machine's changing load
hits both sides of every ratio alike.  Reported per plan: the median over
rounds of the time saving and of its ratio to the FLOP saving, with the
quartiles and range of that ratio.  ``skipping: per call`` times single
denoiser calls of the full stack and of each one-brick skip, interleaved over
many rounds: the part of a call that skipping cannot remove (the embedder, the
preconditioning, each engine call's dispatch) shows there as a ratio below 1.
``skipping: brick time shares`` times each engine alone in its runtime (the
CPU backends' ONNX files) at the per-call shape: a brick that runs faster per
FLOP than the rest has a share of the time below its share of the FLOPs, and
skipping it can save at most that fraction of its FLOP share (``share_ratio``),
whatever the chain does.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from benchmarks.backends import DEVICE, available_backends, denoiser, precision_of
from benchmarks.conftest import SHIPPED
from benchmarks.harness import interleaved_ms, paired, quartiles
from benchmarks.profiling import PROFILED, call_feeds, engine_ms, profiled
from lego_model import SkipPlan, draw_latents, edm_sample
from lego_model.flops import brick_flops, denoiser_flops, embedder_flops

pytestmark = pytest.mark.benchmark

MODELS = [SHIPPED, "lego_S_PG_64", "lego_S_PR_64"]
# Rounds (a plan's run and a full run each) per plan and backend: at least ROUNDS[0], more while the plan's
# budget lasts.  Single runs of plans that remove a few % of the FLOPs gave saving ratios from -2.8 to 3.3 on a
# loaded 2-core machine: medians and quartiles over paired rounds say more.
ROUNDS = (3, 25)
PLAN_BUDGET_S = 5.0
# Per-call rounds (one call of every active set each): cheap, so many.
CALL_ROUNDS = (15, 401)
CALL_BUDGET_S = 8.0
QUALITY_BATCH = 10  # images per sampling batch of the per-backend quality table
# Samples per class of the per-backend quality table, per plan.  The full stack's rows decide int8_auto_bounds,
# so they get 100 per class: at 20 (200 samples) one sample is half a point of accuracy, and OpenVINO int8 read
# -2.5 points on the AMD Zen 4 where 1000 samples read +0.1 (85.1 % against 85.0 %).
QUALITY_PER_CLASS = {"full": 100, "global@0.6": 20}


def plans(cfg) -> dict[str, SkipPlan]:
    n = cfg.num_bricks
    out = {"full": SkipPlan(n)}
    for k in range(n):
        out[f"skip brick {k}"] = SkipPlan.parse([f"{k}@0:1"], cfg)
    for spec in ("global@0.4", "global@0.6", "local@0.4", "local@0.6"):
        out[spec] = SkipPlan.preset(spec, cfg)
    return out


def _setting(bm, name: str):
    """(steps, batch, latents, labels, x, sigma) of the skipping benchmarks for model ``name``."""
    cfg = bm.config
    steps = 18 if name == SHIPPED else 6
    batch = 8 if name == SHIPPED else 1
    latents, labels, _ = draw_latents(list(range(batch)), cfg.img_channels, cfg.resolution, cfg.resolution,
                                      cfg.label_dim)  # fmt: skip
    latents = latents.to(DEVICE)
    x, sigma = latents * 2.5, torch.full((batch,), 2.5, dtype=torch.float64, device=DEVICE)
    return steps, batch, latents, labels, x, sigma


def _savings(ms: list[float], full_ms: list[float], predicted: float):
    """(time savings, their ratios to the FLOP saving ``predicted``, the ratios' quartiles), each saving against
    the full-stack time of the same round."""
    savings = [1 - r for r in paired(ms, full_ms)]
    ratios = [s / predicted for s in savings] if predicted > 0 else [float("nan")]
    return savings, ratios, quartiles(ratios)


@pytest.mark.parametrize("name", MODELS)
def test_skip_savings(bench_models, report, name):
    """Each plan's whole-run time against a full run timed next to it, per backend, beside its FLOP saving."""
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    bm = bench_models[name]
    cfg = bm.config
    h = w = cfg.resolution
    steps, batch, latents, labels, x, sigma = _setting(bm, name)
    for backend in [b for b in available_backends(bm) if b != "compile"]:
        kw = dict(batch=batch, height=h, width=w, labels=labels, num_steps=steps)
        with denoiser(bm, backend, **kw) as fn:
            # Warm-up: one call per active set any plan uses (bindings, graphs).
            for active in {a for plan in plans(cfg).values() for a in plan.steps(steps)}:
                fn(x, sigma, active)
            runs = {
                plan_name: functools.partial(
                    edm_sample, fn, latents, num_steps=steps, active_per_step=plan.steps(steps),
                    randn_like=torch.zeros_like,
                )
                for plan_name, plan in plans(cfg).items()
            }  # fmt: skip
            timed = {
                plan_name: interleaved_ms(
                    {"full": runs["full"], plan_name: runs[plan_name]},
                    min_rounds=ROUNDS[0], max_rounds=ROUNDS[1], budget_s=PLAN_BUDGET_S,
                )
                for plan_name in plans(cfg) if plan_name != "full"
            }  # fmt: skip
        for plan_name, plan in plans(cfg).items():
            if plan_name == "full":
                continue
            predicted = 1 - plan.relative_cost(cfg, steps, "heun", h, w)
            t = timed[plan_name]
            savings, ratios, (q1, q3) = _savings(t[plan_name], t["full"], predicted)
            report.add(
                "skipping", model=name, backend=backend, precision=precision_of(backend), plan=plan_name,
                steps=steps, batch=batch, rounds=len(savings), run_ms=statistics.median(t[plan_name]),
                full_ms=statistics.median(t["full"]), flop_saving=predicted, time_saving=statistics.median(savings),
                saving_ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3,
                ratio_min=min(ratios), ratio_max=max(ratios),
            )  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_skip_savings_per_call(bench_models, report, name):
    """One denoiser call of each one-brick skip against the full stack's, interleaved, per backend."""
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    bm = bench_models[name]
    cfg = bm.config
    h = w = cfg.resolution
    steps, batch, _, labels, x, sigma = _setting(bm, name)
    full = tuple(range(cfg.num_bricks))
    sets = {"full": full} | {f"skip brick {k}": tuple(b for b in full if b != k) for k in full}
    full_flops = denoiser_flops(cfg, h, w, full)
    for backend in [b for b in available_backends(bm) if b != "compile"]:
        kw = dict(batch=batch, height=h, width=w, labels=labels, num_steps=steps)
        with denoiser(bm, backend, **kw) as fn:
            for active in sets.values():
                fn(x, sigma, active)
            calls = {n: functools.partial(fn, x, sigma, active) for n, active in sets.items()}
            t = interleaved_ms(calls, min_rounds=CALL_ROUNDS[0], max_rounds=CALL_ROUNDS[1], budget_s=CALL_BUDGET_S)
        for set_name, active in sets.items():
            if set_name == "full":
                continue
            predicted = 1 - denoiser_flops(cfg, h, w, active) / full_flops
            savings, ratios, (q1, q3) = _savings(t[set_name], t["full"], predicted)
            report.add(
                "skipping: per call", model=name, backend=backend, precision=precision_of(backend),
                active=",".join(map(str, active)), batch=batch, rounds=len(savings),
                call_ms=statistics.median(t[set_name]), full_ms=statistics.median(t["full"]),
                flop_saving=predicted, time_saving=statistics.median(savings),
                saving_ratio=statistics.median(ratios), ratio_q1=q1, ratio_q3=q3,
            )  # fmt: skip


@pytest.mark.parametrize("name", MODELS)
def test_brick_time_shares(bench_models, report, name):
    """Each engine alone, per CPU runtime backend, at the per-call shape: its share of the engines' time beside the
    brick's share of the FLOPs; their ratio bounds what skipping the brick saves (see the module doc)."""
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    from export.manifest import load_manifest
    from runtimes.backends.base import default_threads  # the backends' own thread count

    bm = bench_models[name]
    cfg = bm.config
    h = w = cfg.resolution
    _, batch, *_ = _setting(bm, name)
    feeds = call_feeds(bm.model, batch, h, w)
    # FLOP shares of the whole call (embedder included), as the skip tables' flop_saving counts them.
    flops = {"embedder": embedder_flops(cfg, batch)} | {
        f"brick{k}": brick_flops(cfg, k, h, w, batch) for k in range(cfg.num_bricks)
    }
    for backend in [b for b in available_backends(bm) if b in PROFILED]:
        runtime, precision, files = profiled(backend)
        engine_dir = bm.engines(files)
        times = engine_ms(load_manifest(engine_dir), engine_dir, runtime, feeds, precision=precision,
                          threads=default_threads(), rounds=CALL_ROUNDS, budget_s=CALL_BUDGET_S)  # fmt: skip
        rounds = len(next(iter(times.values())))
        # Per round, each engine's share of that round's engines: the load of the moment hits every share alike.
        shares = {e: [t[i] / sum(ts[i] for ts in times.values()) for i in range(rounds)] for e, t in times.items()}
        for engine, t in times.items():
            share = statistics.median(shares[engine])
            flop_share = flops[engine] / sum(flops.values())
            report.add(
                "skipping: brick time shares", model=name, backend=backend, files=files, float_ops=precision,
                batch=batch, size=f"{h}x{w}", engine=engine, rounds=rounds, ms=statistics.median(t),
                time_share=share, flop_share=flop_share, share_ratio=share / flop_share,
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
    steps = 18
    for plan_name, per_class in QUALITY_PER_CLASS.items():
        real_feats, _ = real_reference(classifier, cfg.resolution, per_class)
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
