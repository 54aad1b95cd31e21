"""Single-task baselines with the same budget, and Δm of a multi-task run against them."""
from __future__ import annotations

import copy
from typing import Any

from ..config import Config, TaskOverride
from ..errors import ConfigError, MTLVisionError
from ..evaluation.delta_m import delta_m
from ..registry import METHODS
from ..rundir import RunDir


def single_task_config(cfg: Config, task: str, all_tasks: list[str]) -> Config:
    """Same data, model, optimiser and epochs; only `task` enabled; equal weighting; no nesting."""
    stl = copy.deepcopy(cfg)
    stl.name = f"{cfg.name}-stl-{task}"
    for other in all_tasks:
        o = stl.tasks.setdefault(other, TaskOverride())
        o.enabled = other == task
    stl.balancing = METHODS.spec("equal", "balancing")
    stl.baselines.single_task = False
    stl.baselines.runs = {}
    return stl


def check_baseline_runs(cfg: Config) -> None:
    """`baselines.runs` must name finished runs before any training starts."""
    for task, run in cfg.baselines.runs.items():
        if not RunDir(run).is_finished():
            raise ConfigError(f"baselines.runs.{task}: {RunDir(run) / 'summary.json'} does not exist "
                              "(give a finished single-task run directory)")


def attach_delta_m(out: RunDir, summary: dict[str, Any], stl_dirs: dict[str, str], write: bool = True,
                   ) -> dict[str, Any]:
    """Add per-task STL accuracies and Δm (test accuracy) to the summary (and summary.json when `write`)."""
    stl = {}
    for task in summary["tasks"]:
        if task not in stl_dirs:
            raise MTLVisionError(f"baselines.runs: no single-task run given for task {task!r}")
        other = RunDir(stl_dirs[task]).read_summary()
        if other is None:
            raise MTLVisionError(f"baselines.runs.{task}: {RunDir(stl_dirs[task]) / 'summary.json'} does not exist "
                                 "(is the run finished?)")
        if task not in other["tasks"]:
            raise MTLVisionError(f"baselines.runs.{task}: {stl_dirs[task]} has no task {task!r} "
                                 f"(has {sorted(other['tasks'])})")
        stl[task] = other["tasks"][task]["test"]["accuracy"]
    mtl = {t: m["test"]["accuracy"] for t, m in summary["tasks"].items()}
    summary["single_task"] = {"test_accuracy": stl, "runs": stl_dirs}
    summary["delta_m"] = round(delta_m(mtl, stl), 4)
    if write:
        out.write_summary(summary)
    return summary
