"""Evaluate a model on one split of every input stream."""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch
from torch import nn

from ..data.loader import TensorImages, eval_batches
from ..tasks import Task
from .metrics import TaskMeter


@torch.no_grad()
def evaluate_meters(model: nn.Module, splits: list[tuple[TensorImages, list[str]]], tasks: list[Task],
                    normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    shard: tuple[int, int] = (0, 1)) -> dict[str, TaskMeter]:
    """Run the model over `splits` (this rank's part of each) and return each task's filled TaskMeter,
    whose confusion matrix reports need beyond the summary metrics of `evaluate`."""
    was_training = model.training
    model.eval()
    by_name = {t.name: t for t in tasks}
    meters = {t.name: TaskMeter(t, splits[0][0].device) for t in tasks}
    rank, world = shard
    for data, names in splits:
        for x, y in eval_batches(data, batch_size, len(data) * rank // world, len(data) * (rank + 1) // world):
            with autocast():
                out = model(normalize(x))
            for name in names:
                logits = out.logits[name].float()
                meters[name].update(logits, y[name], by_name[name].loss(logits, y[name]))
    model.train(was_training)
    return meters


@torch.no_grad()
def evaluate(model: nn.Module, splits: list[tuple[TensorImages, list[str]]], tasks: list[Task],
             normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             shard: tuple[int, int] = (0, 1), all_reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             ) -> dict[str, dict[str, float]]:
    """Per-task metrics (loss, accuracy, ...) over `splits`: (images, task names they label).

    Data parallel: with `shard` = (rank, world size) each rank scores its own contiguous part of every
    split and `all_reduce` (a sum over ranks) combines the counts and loss sums, so every rank gets
    the metrics one process would compute on the whole splits.
    """
    meters = evaluate_meters(model, splits, tasks, normalize, batch_size, autocast, shard)
    if all_reduce is not None:  # one all_reduce of every meter's counts and sums (integers exact in float64)
        state = [t for m in meters.values() for t in (m.confusion, m.top5, m.loss_sum)]
        total = all_reduce(torch.cat([t.reshape(-1).double() for t in state]))
        for t, v in zip(state, total.split([t.numel() for t in state])):
            t.copy_(v.view_as(t))
    return {name: m.compute() for name, m in meters.items()}
