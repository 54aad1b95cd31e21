"""Evaluate a model on one split of every input stream."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from ..data.loader import TensorImages, eval_batches
from ..tasks import Task
from .metrics import TaskMeter


@torch.no_grad()
def evaluate(model: nn.Module, splits: list[tuple[TensorImages, list[str]]], tasks: list[Task],
             normalize: Callable[[torch.Tensor], torch.Tensor], batch_size: int,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             ) -> dict[str, dict[str, float]]:
    """Per-task metrics (loss, accuracy, ...) over `splits`: (images, task names they label)."""
    was_training = model.training
    model.eval()
    by_name = {t.name: t for t in tasks}
    meters = {t.name: TaskMeter(t, splits[0][0].device) for t in tasks}
    for data, names in splits:
        for x, y in eval_batches(data, batch_size):
            with autocast():
                out = model(normalize(x))
            for name in names:
                logits = out.logits[name].float()
                meters[name].update(logits, y[name], by_name[name].loss(logits, y[name]))
    model.train(was_training)
    return {name: m.compute() for name, m in meters.items()}
