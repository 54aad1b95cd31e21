"""Optimiser (SGD-Nesterov / AdamW) with per-parameter learning-rate scales, and the per-step schedule
(cosine or one-cycle, linear warm-up)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import FinetuneConfig, TrainConfig
from ..models import Backbone


def lr_scales(ft: FinetuneConfig, model: nn.Module) -> dict[int, float]:
    """Learning-rate multiplier of every backbone parameter (by id): `backbone_lr`, times
    `layer_decay ** (layers - 1 - depth)` with each parameter's depth from `Backbone.layer_ids`. Parameters
    outside the backbones (heads, sharing modules, fresh experts) keep 1."""
    scales: dict[int, float] = {}
    for module in model.modules():
        if not isinstance(module, Backbone):
            continue
        depth, top = module.layer_ids(), module.num_layers - 1
        for name, p in module.named_parameters():
            decay = ft.layer_decay ** (top - depth.get(name, top)) if ft.layer_decay is not None else 1.0
            scales.setdefault(id(p), ft.backbone_lr * decay)
    return scales


def build_optimizer(cfg: TrainConfig, model: nn.Module, extra: list[nn.Parameter],
                    ft: Optional[FinetuneConfig] = None) -> torch.optim.Optimizer:
    """Weight decay on conv/linear weights (and norms and biases with `decay_norms`), never on the
    architecture's gates or the balancing method's parameters; one parameter group per (decay, lr scale)."""
    skip = getattr(model, "no_weight_decay", frozenset())
    scales = lr_scales(ft, model) if ft is not None else {}
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = (p.ndim > 1 or cfg.decay_norms) and name not in skip
            groups.setdefault((decay, scales.get(id(p), 1.0)), []).append(p)
    groups[(False, 1.0)] += [p for p in extra if p.requires_grad]
    params = [{"params": ps, "weight_decay": cfg.weight_decay if decay else 0.0, "lr": cfg.lr * scale}
              for (decay, scale), ps in groups.items() if ps or scale == 1.0]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int,
                    ) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "onecycle":
        # OneCycleLR divides by (warm-up steps - 1): keep at least 2 warm-up steps
        pct = min(0.5, max((warm / total) if warm else 0.25, 2.0 / total))
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total, 4), pct_start=pct,
            anneal_strategy="cos", cycle_momentum=cfg.optimizer == "sgd" and cfg.momentum > 0,
            base_momentum=0.85 if cfg.momentum >= 0.85 else cfg.momentum, max_momentum=max(cfg.momentum, 0.85))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
