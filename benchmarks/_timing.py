"""Interleaved timing and paired-ratio statistics for the benchmark scripts (not a public API).

Why interleave finely: on a shared CPU the load drifts over seconds, so timing variant A for a minute
and then variant B for a minute measures the drift as much as the variants. Here every *cycle* runs
each variant once (one training step, or whatever unit the script times), back to back, and a ratio is
taken between the two variants' times within the same cycle: both saw nearly the same machine.

Order: cycle c starts at variant c mod n and goes around; every block of n cycles runs in the opposite
direction to the one before. Over 2n cycles every variant takes every position equally often and
follows each of its two neighbours, so no variant is always "first after the garbage collector" or
"always after the memory-hungry one". Warm-up cycles (same order) come first and are discarded.
Python's cyclic garbage collector is off inside a cycle and run between cycles (untimed).

Statistics: the median of the per-cycle ratios, with a distribution-free confidence interval of that
median from order statistics (the binomial sign-test interval: no assumption about the shape of the
noise). With fewer than 6 cycles no interval reaches 95% coverage; `coverage` says what it reached, and
a verdict is only given at >= 95%. `verdict()` says "pass" / "fail" only when the whole interval lies on
one side of the goal, else "inconclusive".
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import time
from typing import Any, Callable, Optional

LEVEL = 0.95  # confidence of the interval of the median
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_timing_args(ap: argparse.ArgumentParser, steps: int = 3, warmup: int = 2, rounds: int = 5) -> None:
    """The options of every interleaved benchmark: steps and rounds (cycles = rounds x steps), warm-up,
    clock, device, threads, --json and --smoke."""
    ap.add_argument("--steps", type=positive_int, default=steps,
                    help=f"timed cycles per round (default {steps}); a cycle runs one step of every variant")
    ap.add_argument("--warmup", type=non_negative_int, default=warmup,
                    help=f"untimed cycles first (default {warmup})")
    ap.add_argument("--rounds", type=positive_int, default=rounds,
                    help=f"rounds (default {rounds}): rounds x steps timed cycles in all")
    ap.add_argument("--clock", choices=list(CLOCKS), default="wall",
                    help="wall (default) or cpu: this process's CPU time, which other processes on a shared "
                         "machine barely move; meaningful with --threads 1 (idle threads spin and count)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=positive_int, default=default_threads(),
                    help="torch threads (default: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes, one short round: checks that the benchmark runs (numbers meaningless)")


def check_timing_args(ap: argparse.ArgumentParser, args: argparse.Namespace, **smoke: Any) -> None:
    """--smoke: set `smoke`'s values (and one cycle, no warm-up, one thread: tiny ops on several threads of
    a busy machine spin); refuse a CPU clock on a GPU."""
    if args.smoke:
        for key, value in {"steps": 1, "rounds": 1, "warmup": 0, "threads": 1, **smoke}.items():
            setattr(args, key, value)
    if args.clock == "cpu" and args.device != "cpu":
        ap.error("--clock cpu measures CPU time: use it with --device cpu")


def cycle_order(names: list[str], c: int) -> list[str]:
    """The order of cycle `c`: rotated by c, reversed in every other block of len(names) cycles."""
    n = len(names)
    k = c % n
    order = names[k:] + names[:k]
    return order[::-1] if (c // n) % 2 else order


def interleave(variants: dict[str, Callable[[], Any]], cycles: int, warmup: int = 0,
               sync: Optional[Callable[[], None]] = None, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of each variant over `cycles` timed cycles (after `warmup` untimed ones); the
    i-th entry of every list comes from the same cycle. `sync` (e.g. torch.cuda.synchronize) runs
    inside each timed call; `clock` is "wall" or "cpu" (process CPU time)."""
    now = CLOCKS[clock]
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    enabled = gc.isenabled()
    gc.disable()
    try:
        for c in range(warmup + cycles):
            for name in cycle_order(names, c):
                t0 = now()
                variants[name]()
                if sync is not None:
                    sync()
                if c >= warmup:
                    times[name].append(now() - t0)
            gc.collect()
    finally:
        if enabled:
            gc.enable()
    return times


def median_ci(values: list[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(low, high, coverage): the order-statistic interval [x_(k), x_(n+1-k)] of the median with the
    largest k whose coverage 1 - 2 P(Binomial(n, 1/2) < k) is still >= `level`; with too few values
    for that, [min, max] and the lower coverage it has."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def ratio_stats(num: list[float], den: list[float]) -> dict[str, Any]:
    """Statistics of the paired ratios num[i] / den[i] (one per cycle): median, its confidence interval
    and coverage, interquartile range, min/max, count, and the ratio of the medians."""
    if len(num) != len(den) or not num:
        raise ValueError(f"expected paired, non-empty timings, got {len(num)} and {len(den)}")
    r = [a / b for a, b in zip(num, den)]
    lo, hi, cov = median_ci(r)
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return {"median": statistics.median(r), "ci": [lo, hi], "coverage": cov, "iqr": [q[0], q[2]],
            "min": min(r), "max": max(r), "n": len(r),
            "of_medians": statistics.median(num) / statistics.median(den)}


def verdict(stats: dict[str, Any], goal: float, higher_is_better: bool = False) -> str:
    """"pass" / "fail" when the median's whole confidence interval lies on one side of `goal` (and the
    interval reaches the wanted coverage), else "inconclusive"."""
    if stats["coverage"] < LEVEL:
        return "inconclusive"
    lo, hi = stats["ci"]
    if higher_is_better:
        lo, hi, goal = -hi, -lo, -goal
    return "pass" if hi <= goal else "fail" if lo > goal else "inconclusive"


def fmt_ratio(stats: dict[str, Any]) -> str:
    """'1.012 [0.981, 1.040]' (median and its interval)."""
    lo, hi = stats["ci"]
    return f"{stats['median']:.3f} [{lo:.3f}, {hi:.3f}]"


def within(stats: dict[str, Any], center: float = 1.0, tol: float = 0.03) -> bool:
    """True when the median's interval (at the wanted coverage) lies inside center ± tol: the run
    resolves differences of `tol`. Used on a variant whose true ratio is known (e.g. `fixed` against
    EW: exactly 1)."""
    lo, hi = stats["ci"]
    return stats["coverage"] >= LEVEL and center - tol <= lo and hi <= center + tol


def ratio_fields(stats: dict[str, Any], goal: Optional[float] = None, higher_is_better: bool = False
                 ) -> dict[str, Any]:
    """The JSON fields of one ratio: median, interval, coverage, IQR, range, count, goal and verdict."""
    return {"ratio": stats["median"], "ratio_ci": stats["ci"], "ci_coverage": stats["coverage"],
            "ratio_iqr": stats["iqr"], "ratio_range": [stats["min"], stats["max"]], "cycles": stats["n"],
            "goal": goal, "verdict": None if goal is None else verdict(stats, goal, higher_is_better)}
