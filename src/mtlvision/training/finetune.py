"""Fine-tuning controls the loop applies: the backbone frozen for the first epochs (a linear probe, then full
fine-tuning), BatchNorm statistics frozen, and an exponential moving average (EMA) of the weights.

* Freezing: the parameters of every `Backbone` in the model (the backbone, cross-stitch's copies; not the
  mixture-of-experts' freshly initialised experts) stop requiring gradients and those modules run in eval
  mode (BatchNorm running statistics, no dropout or drop-path), so nothing is back-propagated through them.
* `freeze_bn`: every BatchNorm layer in eval mode throughout training; their affine weights still train.
* EMA: torch's `AveragedModel` with its EMA averaging function over parameters and buffers, updated after
  every optimiser step; validation, model selection, best.pt and the summary use the averaged weights.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..config import FinetuneConfig
from ..models import Backbone


class FineTuning:
    def __init__(self, cfg: FinetuneConfig, model: nn.Module) -> None:
        self.cfg, self.model = cfg, model
        self.backbones = [m for m in model.modules() if isinstance(m, Backbone)]
        self.ema: Optional[AveragedModel] = None
        if cfg.ema is not None:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)

    @property
    def eval_model(self) -> nn.Module:
        """The weights to evaluate and save: the EMA's when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def frozen(self, epoch: int) -> bool:
        return epoch < self.cfg.freeze_backbone_epochs

    def start_epoch(self, epoch: int) -> None:
        """Put the model in training mode, with what this epoch freezes in eval mode and without gradients."""
        self.model.train()
        frozen = self.frozen(epoch)
        for backbone in self.backbones:
            backbone.requires_grad_(not frozen)
            if frozen:
                backbone.eval()
        if self.cfg.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def after_step(self) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def buffers(self) -> list[torch.Tensor]:
        """Floating-point buffers to average across data-parallel ranks besides the model's (the EMA's)."""
        return [b for b in self.ema.module.buffers() if b.is_floating_point()] if self.ema is not None else []
