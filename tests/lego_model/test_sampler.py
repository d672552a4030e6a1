"""EDM sampler mechanics beyond the fixture runs."""

from __future__ import annotations

import pytest
import torch

from lego_model import LegoError, draw_latents, edm_sample, edm_schedule
from lego_model.sampler import evaluations_per_step


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
