"""EDM sampler mechanics beyond the fixture runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lego_model import LegoError, LegoModel, ShapeError, draw_latents, edm_sample, edm_schedule, get_config
from lego_model.eager import sample_images
from lego_model.sampler import NonFiniteWatch, evaluations_per_step


def test_schedule_ends_at_zero_and_decreases():
    t = edm_schedule(5)
    assert t.dtype == torch.float64 and t[-1] == 0 and t[0] == pytest.approx(80.0) and t[-2] == pytest.approx(0.002)
    assert bool((t[1:] < t[:-1]).all())


@pytest.mark.parametrize("solver,calls", [("heun", 2 * 5 - 1), ("euler", 5)])
def test_solver_call_counts_and_active_sets(solver, calls):
    seen = []

    def denoise(x, sigma, active):
        seen.append((active, sigma.dtype, x.dtype))
        return torch.zeros_like(x)

    plan = [(0, 1), (0, 1), (1,), (1,), (0,)]
    out = edm_sample(denoise, torch.randn(2, 1, 4, 4), num_steps=5, solver=solver, active_per_step=plan)
    assert len(seen) == calls == sum(evaluations_per_step(5, solver))
    assert [a for a, _, _ in seen][-1] == (0,)
    assert all(s == torch.float64 and x == torch.float64 for _, s, x in seen)
    # D = 0 everywhere drives x to 0 at t_N = 0.
    assert out.abs().max() < 1e-12


def test_same_seed_same_latents_regardless_of_batch():
    a, _, _ = draw_latents([5, 6], 3, 8, 8)
    b, _, _ = draw_latents([6], 3, 8, 8)
    assert torch.equal(a[1], b[0])


def test_class_index_checks():
    _, labels, _ = draw_latents([0, 1], 1, 4, 4, label_dim=10, class_idx=3)
    assert labels.argmax(1).tolist() == [3, 3]
    with pytest.raises(LegoError, match="classes 0..9"):
        draw_latents([0], 1, 4, 4, label_dim=10, class_idx=10)
    with pytest.raises(LegoError, match="unconditional"):
        draw_latents([0], 1, 4, 4, label_dim=0, class_idx=1)


def test_plan_length_must_match_steps():
    with pytest.raises(LegoError, match="covers 2 steps"):
        edm_sample(lambda x, s, a: x, torch.randn(1, 1, 4, 4), num_steps=3, active_per_step=[(0,), (0,)])


def test_sampler_needs_a_plan_or_the_brick_set():
    """The sampler cannot know the brick count: no plan and no brick set is refused, not run with no bricks."""
    with pytest.raises(LegoError, match="active_per_step .* or all_bricks"):
        edm_sample(lambda x, s, a: x, torch.randn(1, 1, 4, 4), num_steps=3)
    seen = set()
    edm_sample(lambda x, s, a: seen.add(a) or x, torch.randn(1, 1, 4, 4), num_steps=3, all_bricks=(0, 1))
    assert seen == {(0, 1)}


def test_class_and_guidance_refusals_have_one_wording():
    pr, pg = get_config("tiny_PR_16"), get_config("tiny_PG_16")
    unconditional = "tiny_PR_16 is unconditional: .* needs a class-conditional model"
    with pytest.raises(ShapeError, match=unconditional):
        pr.check_guidance(2.0)
    with pytest.raises(ShapeError, match=unconditional):
        pr.check_class(1)
    with pytest.raises(ShapeError, match="class 10 out of range: tiny_PG_16 has classes 0..9"):
        pg.check_class(10)
    pr.check_guidance(None), pr.check_class(None), pg.check_guidance(2.0), pg.check_class(9)


# Peak RSS growth of one sampling run, in MiB, in a fresh process (ru_maxrss is a process-wide high-water mark).
PEAK_SCRIPT = """
import contextlib, resource, sys, torch
from lego_model import LegoModel, draw_latents, edm_sample, get_config
torch.set_num_threads(1)
model = LegoModel(get_config("tiny_U_16")).randomize_(0).eval()  # parameters require grad, as after loading
latents, labels, rnd = draw_latents([0, 1], 3, 64, 32, 10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad() if sys.argv[1] == "no_grad" else contextlib.nullcontext():
    out = edm_sample(lambda x, s, a: model(x, s, labels, a), latents, num_steps=6, all_bricks=(0, 1, 2, 3, 4))
assert not out.requires_grad and out.grad_fn is None
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def _peak_mib(mode: str) -> float:
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    return float(done.stdout.split()[-1])


def test_sampling_with_grad_enabled_records_no_autograd_graph():
    """With grad enabled the run peaks as under no_grad (before the fix: 298 MiB against 43 MiB)."""
    with_grad, without = _peak_mib("grad"), _peak_mib("no_grad")
    assert with_grad <= 1.5 * without + 32, f"peak RSS growth {with_grad:.0f} MiB with grad, {without:.0f} without"


def test_eager_samples_are_plain_tensors_in_grad_mode():
    """sample_images leaves no autograd history, and its result can enter a later autograd computation
    (an inference-mode tensor could not be saved for backward)."""
    model = LegoModel(get_config("tiny_PG_16")).randomize_(0).eval()
    images = sample_images(model, [0], steps=2, classes=1).float()
    assert not images.requires_grad and images.grad_fn is None
    w = torch.ones(1, requires_grad=True)
    (images * w).sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nonfinite_watch_keeps_the_first_bad_call_per_slot_on_either_path(host_reads, dtype):
    watch = NonFiniteWatch(3, "cpu", host_reads=host_reads)
    good = torch.randn(2, 3, 8, 8, dtype=dtype)
    for call, bad_slot, value in [(1, None, None), (2, 1, float("nan")), (3, 2, float("-inf")), (4, 1, float("inf"))]:
        watch.next_call()
        assert int(watch.calls) == call
        for slot in range(3):
            out = good.clone()
            if slot == bad_slot:
                out[1, 2, 5, 7] = value  # one element, away from any vector boundary
            watch.record(slot, out)
    assert watch.first_bad.tolist() == [-1, 2, 3]  # slot 1's later Inf does not move its first bad call
    assert watch.first() == (2, 1)
