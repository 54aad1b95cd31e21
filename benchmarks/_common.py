"""Shared helpers for the benchmark scripts (not a public API): the table/JSON report, a description of
the environment and a random-image source. Timing and ratio statistics are in `_timing.py`, smoke-run
helpers in `_smoke.py`."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlvision.data.arrays import ImageSet
from mtlvision.data.sources import SOURCES, Source, SourceData
from mtlvision.tasks import Task

from _timing import default_threads  # noqa: F401  (re-exported for the scripts)

REPO_ROOT = Path(__file__).resolve().parent.parent


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

