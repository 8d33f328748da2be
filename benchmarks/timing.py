"""The benchmarks' one way to time things.

The machine that runs them is often shared: its speed drifts and load arrives in bursts. So the functions
being compared take turns (one call of each per turn, after warm-up), and each gets the median of its own
calls: a burst or a drift weighs on all of them alike, and their ratios hold up better than their times.
"""

from __future__ import annotations

import statistics
import time


def medians(fns, repeats: int, warmup: int = 1, budget: float = 0.0, most: int = 25) -> list[float]:
    """Median wall time in seconds of each function over at least `repeats` turns, more (up to `most`) while
    the turns so far took under `budget` seconds; `warmup` calls of each first."""
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
    return [statistics.median(t) for t in times]
