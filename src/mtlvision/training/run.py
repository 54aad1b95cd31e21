"""A training run end to end: the multi-task model, then (when asked) its single-task baselines and Δm.

Under torchrun every worker calls `train` with the same arguments (see `distributed.py`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

from ..config import Config, as_config
from ..errors import CheckpointError, MTLVisionError
from ..rundir import RunDir, config_differences
from . import distributed
from .assembly import assemble
from .baselines import attach_delta_m, check_baseline_runs, single_task_config
from .callbacks import Callback, Telemetry
from .runtime import setup_runtime
from .trainer import Trainer


def default_out_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


def build_trainer(cfg: Config, out_dir: str | os.PathLike, resume: bool = False, quiet: bool = False,
                  overwrite: bool = False, callbacks: Iterable[Callback] = ()) -> Trainer:
    """A Trainer for `cfg` writing to `out_dir`: resuming the run there (`resume`, or a worker torchrun
    restarted when a checkpoint exists), or starting afresh in a folder that holds no run's files (unless
    `overwrite`, or they were written by this same torchrun job before a restart)."""
    rt = setup_runtime(cfg.train)
    run = RunDir(out_dir)
    restarted = rt.restarted()  # every rank resumes if any was restarted (torchrun counts restarts per node)
    resume = resume or (restarted and run.has_checkpoint())
    if resume and not run.has_checkpoint():
        raise CheckpointError(f"--resume {run.path}: no checkpoint.pt there")
    if not resume and not overwrite:
        own = restarted and rt.dist.any_rank(rt.dist.is_main and run.written_by(distributed.job_id()), rt.device)
        if not own:
            run.refuse_if_used()
    parts = assemble(cfg, rt, load_weights=not resume)  # resuming: the checkpoint has the weights
    return Trainer(parts, rt, run, [Telemetry(str(run.tb_path)), *callbacks], resume=resume, quiet=quiet)


def train_single_task_baselines(cfg: Config, out: RunDir | str | os.PathLike, tasks: list[str], quiet: bool,
                                ) -> dict[str, str]:
    """Train (or skip, when finished; resume, when interrupted) one single-task run per task under out/stl/.

    A finished baseline is reused only if it was trained with exactly the config this run implies.
    """
    out = out if isinstance(out, RunDir) else RunDir(out)
    dirs = {}
    for task in tasks:
        run = out.baseline(task)
        dirs[task] = str(run.path)
        stl_cfg = single_task_config(cfg, task, tasks)
        if run.is_run():
            diff = config_differences(run.read_config(), stl_cfg)
            if diff:
                raise MTLVisionError(f"{run.path} holds a single-task run with a different config "
                                     f"({', '.join(diff[:8])}); remove it to retrain the baseline")
        if run.is_finished():
            continue
        # this run's own baseline folder: a start that died before its first checkpoint is replaced
        build_trainer(stl_cfg, run.path, resume=run.has_checkpoint(), quiet=quiet, overwrite=True).fit()
    return dirs


def train(config: Config | dict | str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
          resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train (or resume) a run; with `baselines.single_task`, also the single-task runs and Δm."""
    cfg = as_config(config)
    out = RunDir(out_dir if out_dir is not None else default_out_dir(cfg))
    check_baseline_runs(cfg)
    try:
        trainer = build_trainer(cfg, out.path, resume=resume, quiet=quiet, overwrite=overwrite)
        summary = trainer.fit()
        stl_dirs = dict(cfg.baselines.runs)
        if cfg.baselines.single_task:
            stl_dirs.update(train_single_task_baselines(cfg, out, list(summary["tasks"]), quiet))
        if stl_dirs:
            summary = attach_delta_m(out, summary, stl_dirs, write=trainer.dist.is_main)
    finally:
        distributed.shutdown()
    return summary
