"""Parity of every backend with eager fp32: per engine, per denoiser call, per sampling run.

Tolerances are explicit per precision; a breach fails the benchmark after
its row is recorded.  bf16 (OpenVINO and torch at run time) is held to its
tolerance on the shipped, trained model only: with random weights the
activations are chaotic and bf16 rounding is amplified far beyond what it
does to a trained model (rows are recorded for them, not asserted).  int8
engines and denoiser calls are held to the int8 bound of the export's
verification (export.verify.TOLERANCES); their sampled images are recorded,
not bounded: int8 moves samples, and what that costs is measured as quality
(test_skipping.py, "quality per backend").
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.backends import DEVICE, available_backends, denoiser, open_engines, precision_of, run_engine
from benchmarks.conftest import SHIPPED
from benchmarks.harness import max_abs, psnr, rel_l2
from export.verify import TOLERANCES
from lego_model import SkipPlan, draw_latents, edm_sample
from lego_model.precond import canvas_coords, edm_scalings, model_input

pytestmark = pytest.mark.benchmark

# Relative L2 per engine / denoiser call, max abs for images in [-1, 1] units.  bf16 keeps 8 significant bits
# (step 2^-8 = 0.4 %); through a trained model's bricks that stays a few 1e-3 per call, and 18 Heun steps move a
# pixel by at most a few uint8 levels (0.05 in [-1, 1] units is 6 levels).
TOLERANCE = {
    "fp32": {"rel_l2": 1e-4, "image_max_abs": 1e-3},
    "bf16": {"rel_l2": 3e-2, "image_max_abs": 5e-2},
    "int8": {"rel_l2": TOLERANCES["int8"], "image_max_abs": None},
}
ENGINE_BACKENDS = [b for b in available_backends() if b not in ("eager", "compile")]
MODELS = [SHIPPED, "lego_S_PG_64", "lego_S_PR_64", "lego_S_U_64"]


def _check(name: str, backend: str, what: str, worst: float) -> None:
    """Fail when ``worst`` breaches the backend's precision tolerance (bf16: on the trained model only)."""
    precision = precision_of(backend)
    if precision == "bf16" and name != SHIPPED:
        return
    limit = TOLERANCE[precision][what]
    if limit is None:
        return
    assert worst <= limit, f"{name}/{backend}: worst {what} {worst:.2e} > {limit:g}"


def _get(bench_models, name, backend):
    """The benchmarked model, or a skip when it is not here or has no engines of the backend's precision."""
    if name not in bench_models:
        pytest.skip(f"{name} is not available on this machine")
    bench_models[name].engines(precision_of(backend))
    return bench_models[name]


def _labels(cfg, batch, seed=0):
    if not cfg.label_dim:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.eye(cfg.label_dim)[torch.randint(cfg.label_dim, (batch,), generator=g)]


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_engine_parity(bench_models, report, name, backend):
    """Embedder and every brick alone, on the same inputs as the eager modules, at three shapes (batch 2)."""
    bm = _get(bench_models, name, backend)
    cfg, model = bm.config, bm.model.to(DEVICE)
    worst = 0.0
    with open_engines(bm, backend) as be, torch.inference_mode():
        for shape_name, (h, w) in bm.shapes().items():
            g = torch.Generator().manual_seed(1)
            sigma = torch.tensor([0.05, 20.0])
            _, _, c_in, c_noise = edm_scalings(sigma)
            x = torch.randn(2, cfg.img_channels, h, w, generator=g)
            x_in = model_input(x, c_in, canvas_coords(h, w)).to(DEVICE)
            labels = _labels(cfg, 2)
            cond_ref = model.embed(c_noise.to(DEVICE), None if labels is None else labels.to(DEVICE))
            rows = [("embedder", None, cond_ref)]
            f_prev = 0.3 * torch.randn(2, cfg.img_channels, h, w, generator=g).to(DEVICE)
            for k in range(cfg.num_bricks):
                rows.append((f"brick{k}", k, model.bricks[k](x_in, f_prev if k else None, cond_ref)))
            dev = be.device  # engine I/O lives where the backend runs (the CPU for ONNX Runtime CPU)
            for engine, k, ref in rows:
                out = torch.empty_like(ref, device=dev)
                if k is None:
                    inputs = {"c_noise": c_noise.to(dev)}
                    if labels is not None:
                        inputs["class_labels"] = labels.to(dev)
                    run_engine(be, engine, inputs, {"cond": out})
                else:
                    inputs = {"x_in": x_in.to(dev), "cond": cond_ref.to(dev)}
                    if k:
                        inputs["f_prev"] = f_prev.to(dev)
                    run_engine(be, engine, inputs, {"f": out})
                err = rel_l2(out, ref)
                worst = max(worst, err)
                report.add(
                    "parity: engines", model=name, backend=backend, engine=engine, shape=f"{h}x{w}",
                    size=shape_name, max_abs=max_abs(out, ref), rel_l2=err,
                )  # fmt: skip
    _check(name, backend, "rel_l2", worst)


def _active_sets(cfg) -> list[tuple[int, ...]]:
    """The full stack, the stack without each single brick, and the first brick alone (earliest exit)."""
    n = cfg.num_bricks
    sets = [tuple(range(n))] + [tuple(j for j in range(n) if j != k) for k in range(n)] + [(0,)]
    return list(dict.fromkeys(sets))


def _plan(cfg, name: str) -> SkipPlan:
    return SkipPlan(cfg.num_bricks) if name == "full" else SkipPlan.preset(name, cfg)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_denoiser_parity(bench_models, report, name, backend):
    """Whole denoiser calls with every single-brick skip, with and without guidance, at three shapes.

    Every active set runs at the training size; the larger and non-square sizes
    take the full stack and the earliest exit, which exercise the same engines.
    """
    bm = _get(bench_models, name, backend)
    cfg = bm.config
    worst = 0.0
    guidance = [None, 2.0] if cfg.label_dim else [None]
    for size, (h, w) in bm.shapes().items():
        sets = _active_sets(cfg) if size == "train" else [tuple(range(cfg.num_bricks)), (0,)]
        g = torch.Generator().manual_seed(2)
        x = (torch.randn(2, cfg.img_channels, h, w, generator=g) * 3).double().to(DEVICE)
        sigma = torch.tensor([2.5, 2.5], dtype=torch.float64, device=DEVICE)
        labels = _labels(cfg, 2)
        for cfg_scale in guidance:
            kw = dict(batch=2, height=h, width=w, labels=labels, cfg_scale=cfg_scale)
            with denoiser(bm, "eager", **kw) as eager, denoiser(bm, backend, **kw) as engine:
                for active in sets:
                    ref = eager(x, sigma, active).clone()
                    out = engine(x, sigma, active).clone()
                    err = rel_l2(out, ref)
                    worst = max(worst, err)
                    report.add(
                        "parity: denoiser calls", model=name, backend=backend, shape=f"{h}x{w}",
                        guidance=cfg_scale or "-", active=",".join(map(str, active)),
                        max_abs=max_abs(out, ref), rel_l2=err,
                    )  # fmt: skip
    _check(name, backend, "rel_l2", worst)


@pytest.mark.parametrize("backend", ENGINE_BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_sampling_parity(bench_models, report, name, backend):
    """Whole EDM Heun runs from fixed seeds: final images against eager, full stack and presets."""
    bm = _get(bench_models, name, backend)
    cfg = bm.config
    steps = 18 if name == SHIPPED else 6
    seeds = [0, 1] if name == SHIPPED else [0]
    worst = 0.0
    cases = [("train", None, "full"), ("non-square", None, "global@0.5"), ("train", None, "local@0.5")]
    if cfg.label_dim:
        cases.append(("train", 2.0, "global@0.5"))
    shapes = bm.shapes()
    for shape_name, cfg_scale, plan_name in cases:
        h, w = shapes[shape_name]
        plan = _plan(cfg, plan_name)
        images = {}
        for which in ("eager", backend):
            latents, labels, _ = draw_latents(seeds, cfg.img_channels, h, w, cfg.label_dim)
            kw = dict(batch=len(seeds), height=h, width=w, labels=labels, cfg_scale=cfg_scale, num_steps=steps)
            with denoiser(bm, which, **kw) as fn:
                # No churn: the noise term is multiplied by 0, so zeros stand in for the per-seed draws.
                images[which] = edm_sample(
                    fn,
                    latents.to(DEVICE),
                    num_steps=steps,
                    active_per_step=plan.steps(steps),
                    randn_like=torch.zeros_like,
                ).cpu()
        err = max_abs(images[backend], images["eager"])
        worst = max(worst, err)
        report.add(
            "parity: sampling runs", model=name, backend=backend, shape=f"{h}x{w}", steps=steps,
            guidance=cfg_scale or "-", plan=plan_name, max_abs=err,
            psnr_db=psnr(images[backend].clamp(-1, 1), images["eager"].clamp(-1, 1)),
        )  # fmt: skip
    _check(name, backend, "image_max_abs", worst)
