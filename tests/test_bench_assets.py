"""benchmarks/_assets.py: the matmul peak every MFU is measured against."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _assets  # noqa: E402


def test_the_peak_is_the_best_trial_timed_until_the_least_duration(monkeypatch):
    # start 0; trial 1 takes 2 s, trial 2 0.5 s (the least trials done, 4.5 s < 10 s elapsed),
    # trial 3 0.25 s, then 11 s have passed: stop
    clock = iter([0.0, 1.0, 3.0, 3.5, 4.0, 4.5, 5.0, 5.25, 11.0])
    monkeypatch.setattr(_assets.time, "perf_counter", lambda: next(clock))
    peak = _assets.matmul_peak(False, n=8, repeats=1, trials=2, seconds=10.0)
    assert peak == 2 * 8**3 / 0.25
    assert next(clock, None) is None  # every reading taken: no trial more, none fewer


def test_the_least_trials_are_done_even_past_the_duration(monkeypatch):
    clock = iter([0.0, 1.0, 2.0, 2.0, 6.0, 10.0])  # trial 2 ends past 3 s, still taken
    monkeypatch.setattr(_assets.time, "perf_counter", lambda: next(clock))
    assert _assets.matmul_peak(False, n=8, repeats=1, trials=2, seconds=3.0) == 2 * 8**3 / 1.0


def test_the_highest_peak_of_the_parent_and_the_workers_is_taken(monkeypatch):
    monkeypatch.setattr(_assets, "matmul_peak", lambda bf16: 100.0 if bf16 else 10.0)
    assert _assets.highest_peak(True, {"a": {"peak_flops": 150.0}, "b": {}}) == 150.0
    assert _assets.highest_peak(True, {"a": {"peak_flops": 50.0}}) == 100.0  # a slow worker's reading loses
    assert _assets.highest_peak(False, {}) == 10.0
