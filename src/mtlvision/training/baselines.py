"""Single-task baselines with the same budget, and Δm of a multi-task run against them."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from ..config import Config, TaskOverride, load_config
from ..registry import METHODS
from ..errors import ConfigError, MTLVisionError
from ..evaluation.delta_m import delta_m
from ..storage import write_json


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
        if not (Path(run) / "summary.json").is_file():
            raise ConfigError(f"baselines.runs.{task}: {Path(run) / 'summary.json'} does not exist "
                              "(give a finished single-task run directory)")


def train_single_task_baselines(cfg: Config, out: Path, tasks: list[str], quiet: bool) -> dict[str, str]:
    """Train (or skip, when finished; resume, when interrupted) one STL run per task under out/stl/.

    A finished baseline is reused only if it was trained with exactly the config this run implies.
    """
    from .trainer import Trainer, config_differences

    dirs = {}
    for task in tasks:
        run_dir = out / "stl" / task
        dirs[task] = str(run_dir)
        stl_cfg = single_task_config(cfg, task, tasks)
        if (run_dir / "config.yaml").is_file():
            diff = config_differences(load_config(run_dir / "config.yaml").to_dict(), stl_cfg.to_dict())
            if diff:
                raise MTLVisionError(f"{run_dir} holds a single-task run with a different config "
                                     f"({', '.join(diff[:8])}); remove it to retrain the baseline")
        if (run_dir / "summary.json").is_file():
            continue
        resume = (run_dir / "checkpoint.pt").is_file()
        Trainer(stl_cfg, run_dir, resume=resume, quiet=quiet).fit()
    return dirs


def attach_delta_m(out: Path, summary: dict[str, Any], stl_dirs: dict[str, str], write: bool = True,
                   ) -> dict[str, Any]:
    """Add per-task STL accuracies and Δm (test accuracy) to the summary (and summary.json when `write`)."""
    stl = {}
    for task in summary["tasks"]:
        if task not in stl_dirs:
            raise MTLVisionError(f"baselines.runs: no single-task run given for task {task!r}")
        path = Path(stl_dirs[task]) / "summary.json"
        if not path.is_file():
            raise MTLVisionError(f"baselines.runs.{task}: {path} does not exist (is the run finished?)")
        other = json.loads(path.read_text())["tasks"]
        if task not in other:
            raise MTLVisionError(f"baselines.runs.{task}: {path} has no task {task!r} (has {sorted(other)})")
        stl[task] = other[task]["test"]["accuracy"]
    mtl = {t: m["test"]["accuracy"] for t, m in summary["tasks"].items()}
    summary["single_task"] = {"test_accuracy": stl, "runs": stl_dirs}
    summary["delta_m"] = round(delta_m(mtl, stl), 4)
    if write:
        write_json(out / "summary.json", summary)
    return summary
