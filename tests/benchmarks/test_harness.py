"""The benchmarks' timing helpers (benchmarks/harness.py): interleaved rounds and paired ratios."""

from __future__ import annotations

import time

import pytest

from benchmarks.harness import interleaved_ms, paired, quartiles


def test_interleaved_rounds_alternate_their_order_so_each_call_is_as_often_first_as_second():
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in "abc"}
    samples = interleaved_ms(fns, min_rounds=4, max_rounds=4, budget_s=0.0)
    assert order == list("abccbaabccba")
    assert {n: len(v) for n, v in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for v in samples.values() for t in v)


def test_interleaved_rounds_go_on_while_the_budget_lasts_within_their_bounds():
    def sleep() -> None:
        time.sleep(0.002)

    # A 0 s budget stops at the minimum; a budget the calls cannot use up stops at the maximum.
    assert len(interleaved_ms({"s": sleep}, min_rounds=3, max_rounds=50, budget_s=0.0)["s"]) == 3
    assert len(interleaved_ms({"s": sleep}, min_rounds=3, max_rounds=7, budget_s=60.0)["s"]) == 7
    # In between: a budget of ~50 calls gives more than the minimum and fewer than the maximum.
    n = len(interleaved_ms({"s": sleep}, min_rounds=2, max_rounds=1000, budget_s=0.1)["s"])
    assert 2 < n < 1000
    with pytest.raises(ValueError, match="min_rounds"):
        interleaved_ms({"s": sleep}, min_rounds=5, max_rounds=4, budget_s=0.0)


def test_the_timings_are_the_calls_own():
    fns = {"slow": lambda: time.sleep(0.02), "fast": lambda: None}
    samples = interleaved_ms(fns, min_rounds=3, max_rounds=3, budget_s=0.0)
    assert min(samples["slow"]) >= 20.0 > max(samples["fast"])


def test_paired_ratios_are_per_round_and_refuse_series_of_other_lengths():
    assert paired([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == [2.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="equal"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="equal"):
        paired([], [])


def test_quartiles():
    assert quartiles([5.0]) == (5.0, 5.0)
    q1, q3 = quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    assert q1 < 3.0 < q3
