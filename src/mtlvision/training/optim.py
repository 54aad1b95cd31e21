"""Optimiser (SGD-Nesterov / AdamW) and per-step schedule (cosine or one-cycle, linear warm-up)."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def build_optimizer(cfg: TrainConfig, model: nn.Module, extra: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights (and norms and biases with `decay_norms`), never on the
    architecture's gates or the balancing method's parameters."""
    skip = getattr(model, "no_weight_decay", frozenset())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if (p.ndim > 1 or cfg.decay_norms) and name not in skip else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay + [p for p in extra if p.requires_grad], "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by (warm-up steps - 1): keep at least 2 warm-up steps
        pct = min(0.5, max((warm / total) if warm else 0.25, 2.0 / total))
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.lr, total_steps=max(total, 4), pct_start=pct, anneal_strategy="cos",
            cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
            base_momentum=0.85 if cfg.momentum >= 0.85 else cfg.momentum, max_momentum=max(cfg.momentum, 0.85))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
