"""Task-specific feature vectors with a learned sharing module between them."""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, Architecture


@dataclasses.dataclass
class TaskFeaturesParams:
    feature_dim: int = 128
    sharing: Literal["attention", "gate"] = "attention"


@ARCHITECTURES.register("task-features", params=TaskFeaturesParams)
class TaskFeatures(Architecture):
    r"""Task-specific feature vectors that every head reads through a learned sharing module.

    With h = backbone(x) in R^D and T tasks:

        z_t     = ReLU(LayerNorm(W_t h + b_t))                    task feature, in R^d
        a_{t,s} = softmax_s( (W_q z_t)·(W_k z_s) / sqrt(d) + beta_{t,s} )   ("attention")
        a_{t,s} = softmax_s( beta_{t,s} )                                  ("gate")
        u_t     = z_t + W_o sum_s a_{t,s} W_v z_s
        y_t     = head_t(u_t)

    W_o starts at zero, so training begins from independent task features (u_t = z_t) and learns
    how much each task borrows from the others; beta starts at zero (uniform mixing).
    """

    no_weight_decay = frozenset({"beta"})

    def __init__(self, p: TaskFeaturesParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks)
        t, d, dim = len(tasks), p.feature_dim, backbone.out_dim
        self.sharing = p.sharing
        self.proj_weight = nn.Parameter(torch.empty(t, d, dim))
        self.proj_bias = nn.Parameter(torch.zeros(t, d))
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(self.proj_weight, -bound, bound)
        self.norm = nn.LayerNorm(d)
        self.beta = nn.Parameter(torch.zeros(t, t))
        if p.sharing == "attention":
            self.query = nn.Linear(d, d, bias=False)
            self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.out.weight)
        self.scale = 1 / math.sqrt(d)
        self.heads = nn.ModuleList([build_head(head, d, task.num_classes) for task in tasks])

    def mixing(self, z: torch.Tensor) -> torch.Tensor:
        """Sharing weights a (B, T, T): row t says how much task t reads from each task."""
        scores = self.beta.expand(z.shape[0], -1, -1)
        if self.sharing == "attention":
            scores = scores + self.query(z) @ self.key(z).transpose(1, 2) * self.scale
        return scores.softmax(-1)

    def decode(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.relu(self.norm(torch.einsum("bD,tdD->btd", shared, self.proj_weight) + self.proj_bias))
        u = z + self.out(self.mixing(z) @ self.value(z))
        return {name: head(u[:, i]) for i, (name, head) in enumerate(zip(self.task_names, self.heads))}
