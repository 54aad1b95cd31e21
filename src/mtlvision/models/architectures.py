"""Architectures: how the tasks share the network above (or inside) the backbone.

An architecture returns, for a batch, each task's logits and the `shared` representation: the
tensor every task's loss flows through, which feature-space balancing methods differentiate.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
from torch import nn

from ..registry import Registry
from ..tasks import Task
from .backbones import Backbone
from .heads import build_head

ARCHITECTURES: Registry = Registry("architecture")


@dataclasses.dataclass
class ModelOutput:
    logits: dict[str, torch.Tensor]
    shared: torch.Tensor  # (B, D) representation shared by all tasks


class Architecture(nn.Module):
    """Base: a backbone plus task-specific modules; `shared_parameters()` are the trunk's.

    Heads live in a ModuleList in task order (task names such as "type" or "train" would clash
    with nn.ModuleDict's own attributes).
    """

    no_weight_decay: frozenset[str] = frozenset()  # parameter names the optimiser must not decay

    def __init__(self, backbone: Backbone, tasks: list[Task]) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = [t.name for t in tasks]

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def task_parameters(self) -> list[nn.Parameter]:
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def decode(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ModelOutput:
        shared = self.backbone(x)
        return ModelOutput(self.decode(shared), shared)


@ARCHITECTURES.register("hps")
class HardSharing(Architecture):
    """Hard parameter sharing: one backbone, one head per task on its features."""

    def __init__(self, backbone: Backbone, tasks: list[Task], head: dict) -> None:
        super().__init__(backbone, tasks)
        self.heads = nn.ModuleList([build_head(head, backbone.out_dim, t.num_classes) for t in tasks])

    def decode(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(shared) for name, head in zip(self.task_names, self.heads)}


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

    def __init__(self, p: TaskFeaturesParams, backbone: Backbone, tasks: list[Task], head: dict) -> None:
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
