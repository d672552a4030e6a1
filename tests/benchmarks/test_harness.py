"""The benchmarks' timing helpers (benchmarks/harness.py): interleaved rounds and paired ratios."""

from __future__ import annotations

import statistics
import time

import pytest

from benchmarks import harness
from benchmarks.harness import interleaved_ms, paired, quartiles


class _Clock:
    """A stand-in for the time module whose perf_counter reads ``now`` (seconds), advanced by the calls timed."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


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


def test_turns_of_several_calls_time_the_calls_after_a_lead_in(monkeypatch):
    order: list[str] = []
    fns = {n: (lambda n=n: order.append(n)) for n in "ab"}
    samples = interleaved_ms(fns, min_rounds=2, max_rounds=2, budget_s=0.0, calls_per_turn=3)
    assert order == list("aaabbbbbbaaa")
    assert {n: len(v) for n, v in samples.items()} == {"a": 2, "b": 2}

    # A call right after another fn's is slow (the caches it refills), a repeated one fast, on a fake clock that the
    # calls advance (exact, whatever the machine's load): in turns of 3 the sample is the mean of the two repeats,
    # in turns of 1 most calls are first ones.
    clock = _Clock()
    monkeypatch.setattr(harness, "time", clock)
    last: list[str] = [""]

    def fn(name: str) -> None:
        clock.now += 0.020 if last[0] != name else 0.001
        last[0] = name

    fns = {n: (lambda n=n: fn(n)) for n in "ab"}
    turns = interleaved_ms(fns, min_rounds=3, max_rounds=3, budget_s=0.0, calls_per_turn=3)
    assert all(ms == pytest.approx(1.0) for v in turns.values() for ms in v)
    # (In turns of 1 the fn at a round's end comes first in the next one too: its second call there is fast.)
    one_call = interleaved_ms(fns, min_rounds=3, max_rounds=3, budget_s=0.0)
    assert {n: statistics.median(v) for n, v in one_call.items()} == pytest.approx({"a": 20.0, "b": 20.0})
    with pytest.raises(ValueError, match="calls_per_turn"):
        interleaved_ms(fns, min_rounds=1, max_rounds=1, budget_s=0.0, calls_per_turn=0)
