"""Hard parameter sharing (Caruana 1997): one trunk, one head per task."""
from __future__ import annotations

import torch
from torch import nn

from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, Architecture


@ARCHITECTURES.register("hps")
class HardSharing(Architecture):
    """Hard parameter sharing: one backbone, one head per task on its features."""

    def __init__(self, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks)
        self.heads = nn.ModuleList([build_head(head, backbone.out_dim, t.num_classes) for t in tasks])

    def decode(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(shared) for name, head in zip(self.task_names, self.heads)}
