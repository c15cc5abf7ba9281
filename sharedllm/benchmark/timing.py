"""Wall time of pieces of work, for the benchmarks that time model operations in process: the median
of repeats, or of cases that take turns (so a noisy machine slows every case alike)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(run: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` calls of run, after one untimed call (first-call costs:
    compiled products, allocations) so only the steady state is reported."""
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 2)


def alternating_ms(cases: dict[str, tuple[Callable[[], None], Callable[[], object]]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each case's run (after its untimed setup), the cases taking turns."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for n in range(repeats + 1):
        for name, (setup, run) in cases.items():
            setup()
            started = time.perf_counter()
            run()
            if n:  # the first turn warms up
                times[name].append(time.perf_counter() - started)
    return {name: round(statistics.median(t) * 1000, 2) for name, t in times.items()}
