"""The benchmarks' one way to time things.

The machine that runs them is often shared: its speed drifts and load arrives in bursts. So the functions
being compared take turns (one call of each per turn, after warm-up), and each gets the median of its own
calls: a burst or a drift weighs on all of them alike, and their ratios hold up better than their times.
"""

from __future__ import annotations

import statistics
import time


def turns(fns, repeats: int, warmup: int = 1, budget: float = 0.0, most: int = 25) -> list[list[float]]:
    """Wall times in seconds of each function, one call of each per turn, over at least `repeats` turns, more
    (up to `most`) while the turns so far took under `budget` seconds; `warmup` calls of each first."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < repeats or (spent < budget and len(times[0]) < most):
        for fn, spent_by in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent_by.append(time.perf_counter() - start)
            spent += spent_by[-1]
    return times


def medians(fns, repeats: int, warmup: int = 1, budget: float = 0.0, most: int = 25) -> list[float]:
    """Median wall time in seconds of each function (see turns)."""
    return [statistics.median(t) for t in turns(fns, repeats, warmup, budget, most)]


def turn_ratio(numerator: list[float], denominator: list[float]) -> tuple[float, float, float]:
    """The ratio of two functions' times taken within each turn: (median, lower quartile, upper quartile). Two
    calls of one turn run seconds apart, so a drift of the machine's speed (other tenants' load, memory
    bandwidth) cancels in their ratio, where it would not between two medians taken over the whole run."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3
