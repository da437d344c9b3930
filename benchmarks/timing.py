"""Timing helpers shared by the benchmarks: medians after a warm-up, and alternated timing of two contenders."""

import statistics
import time
from collections.abc import Callable


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median seconds of two functions timed in alternation, so drifts of the machine hit both alike."""
    first(), second()
    times = ([], [])
    for _ in range(repeats):
        for fn, bucket in zip((first, second), times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def per_round_ratio(
    first: Callable[[], float], second: Callable[[], float], rounds: int
) -> tuple[float, float, float]:
    """Two measurements (each returns its seconds) alternated for `rounds` rounds after a warm-up of each.

    Returns the median seconds of each and the median of the per-round ratios first / second: a slow spell of the
    machine hits both sides of a round alike, so the ratio's median is steadier than a ratio of medians.
    """
    first(), second()
    pairs = [(first(), second()) for _ in range(rounds)]
    return (
        statistics.median(a for a, _ in pairs),
        statistics.median(b for _, b in pairs),
        statistics.median(a / b for a, b in pairs),
    )
