"""Shared helpers for the benchmark scripts (not a public API): alternating-round timing, paired ratio
statistics, the table/JSON report and a description of the environment."""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mtlvision.data.arrays import ImageSet
from mtlvision.data.sources import SOURCES, Source, SourceData
from mtlvision.tasks import Task

REPO_ROOT = Path(__file__).resolve().parent.parent


def default_threads() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def add_timing_args(ap: "argparse.ArgumentParser", steps: int = 3, warmup: int = 2, rounds: int = 3) -> None:
    """The options every alternating-round benchmark takes: steps per round, warm-up, rounds, device,
    threads, --json."""
    ap.add_argument("--steps", type=int, default=steps, help=f"steps per variant per round (default {steps})")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"untimed steps first (default {warmup})")
    ap.add_argument("--rounds", type=int, default=rounds, help=f"timed rounds per variant (default {rounds})")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=default_threads(), help="torch threads (default: all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def interleave(variants: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each variant, `rounds` calls each, the order alternating per round (A B, B A, ...)."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            gc.collect()
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return times


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median of the per-round ratios num/den (paired rounds), their range, and the ratio of medians."""
    per_round = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "of_medians": statistics.median(num) / statistics.median(den)}


def report(title: str, rows: list[tuple[str, str]], result: dict[str, Any], as_json: bool) -> None:
    """A two-column table on stdout, or `result` as one JSON object (--json)."""
    if as_json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * max(len(title), width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": default_threads(),
            "python": sys.version.split()[0]}


@dataclasses.dataclass
class RandomParams:
    n_train: int = 1280
    n_eval: int = 128
    classes: list[int] = dataclasses.field(default_factory=lambda: [10, 10, 2])
    size: int = 32
    seed: int = 0
    prefix: str = "task"


class RandomSource(Source):
    """Benchmark-only source: random uint8 RGB images and random labels, one task per entry of `classes`."""

    cacheable = False

    def load(self) -> SourceData:
        p = self.params
        rng = np.random.default_rng(p.seed)
        names = [f"{p.prefix}{i}" for i in range(len(p.classes))]

        def split(n: int) -> ImageSet:
            return ImageSet(rng.integers(0, 256, (n, p.size, p.size, 3), dtype=np.uint8),
                            {t: rng.integers(0, k, n).astype(np.int64) for t, k in zip(names, p.classes)})

        tasks = [Task(t, [str(c) for c in range(k)]) for t, k in zip(names, p.classes)]
        return SourceData(tasks, split(p.n_train), split(p.n_eval), split(p.n_eval))


if "bench-random" not in SOURCES.names():
    SOURCES.register("bench-random", params=RandomParams)(RandomSource)
