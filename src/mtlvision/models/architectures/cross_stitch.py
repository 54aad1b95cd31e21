"""Cross-stitch networks: one backbone per task, mixed by learned T x T linear units after every stage."""
from __future__ import annotations

import copy
import dataclasses
from typing import Literal, Sequence

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, Architecture, ModelOutput


@dataclasses.dataclass
class CrossStitchParams:
    alpha_same: float = 0.9  # initial weight of a task's own network (the paper's alpha_S)
    alpha_diff: float = 0.1  # initial weight of the other networks together (alpha_D), split evenly
    mixing: Literal["channel", "stage"] = "channel"  # one T x T matrix per channel, or one per stage

    def __post_init__(self) -> None:
        if not 0 < self.alpha_same <= 1:
            raise ConfigError(f"model.architecture.alpha_same: expected a value in (0, 1], got {self.alpha_same}")
        if not 0 <= self.alpha_diff <= 1:
            raise ConfigError(f"model.architecture.alpha_diff: expected a value in [0, 1], got {self.alpha_diff}")


def stitch(alpha: torch.Tensor, xs: Sequence[torch.Tensor], channel_dim: int = 1) -> list[torch.Tensor]:
    """Cross-stitch unit: y_t = sum_u alpha[:, t, u] * x_u, per channel (dim `channel_dim` of each x_u: 1 for
    feature maps and vectors, -1 for tokens (B, N, C)).

    `alpha` is (K, T, T) with K the channel count (per-channel mixing) or 1 (one matrix per stage).
    """
    shape = [1] * xs[0].ndim
    shape[channel_dim] = -1
    return [sum(alpha[:, t, u].view(shape) * x for u, x in enumerate(xs)) for t in range(len(xs))]


@ARCHITECTURES.register("cross-stitch", params=CrossStitchParams)
class CrossStitch(Architecture):
    r"""Cross-stitch networks (Misra et al., CVPR 2016): T copies of the backbone, one per task.

    With x_t^j the output of stage j of task t's network and T x T matrices alpha^j:

        x̃_t^j = sum_u alpha^j[c, t, u] x_u^j      per channel c (mixing: channel) or one matrix (stage)
        z_t   = pool_t(x̃_t^J)                     each network's own pool
        y_t   = head_t(sum_u alpha^F[d, t, u] z_u)  final stitch on the pooled features

    alpha starts at alpha_same on the diagonal and alpha_diff / (T - 1) off it (the paper's best
    initialisation, 0.9 / 0.1, extended to T tasks so each row stays a convex combination); with
    alpha = I the model is T independent networks. The copies are deep copies of the configured
    backbone, so they start identical (including `pretrained` weights); the heads differ, so the
    copies diverge from the first step. Differences from the paper: its networks start from one-task
    networks fine-tuned on each task (train single-task runs first to reproduce that), stitches
    follow every stage here (its AlexNet had them after the pooling
    and fully connected layers), and alpha trains at the model's learning rate (the paper scales
    its rate up 10^2-10^3; the optimiser here has one rate) and without weight decay.

    On token backbones (vision transformers, stages of blocks with outputs (B, N, C)) a stitch mixes each
    channel of every token. On a backbone that could not be cut into stages, only the final stitch remains.

    Cut: the trunk is the T networks and the stage stitches; the shared tensor is the stacked pooled
    features (B, T, D) before the final stitch. The final stitch and the heads are downstream, so each
    task's loss reaches every network's features and the feature-space Gramian is not diagonal.
    """

    def __init__(self, p: CrossStitchParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks)
        n = len(tasks)
        self.copies = nn.ModuleList([copy.deepcopy(backbone) for _ in range(n - 1)])
        init = torch.full((n, n), p.alpha_diff / max(1, n - 1)).fill_diagonal_(p.alpha_same)
        sizes = [*backbone.stage_channels(), backbone.out_dim]
        if p.mixing == "stage":
            sizes = [1] * len(sizes)
        self.stitches = nn.ParameterList([nn.Parameter(init.repeat(k, 1, 1)) for k in sizes[:-1]])
        self.final_stitch = nn.Parameter(init.repeat(sizes[-1], 1, 1))
        self.heads = nn.ModuleList([build_head(head, backbone.out_dim, t.num_classes) for t in tasks])
        self.no_weight_decay = frozenset([*(f"stitches.{j}" for j in range(len(self.stitches))), "final_stitch"])

    def networks(self) -> list[Backbone]:
        """Task t's backbone (the configured one for the first task, copies for the others)."""
        return [self.backbone, *self.copies]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Every network and the stage stitches: all upstream of the stacked pooled features."""
        return [p for m in (self.backbone, self.copies, self.stitches) for p in m.parameters()]

    def forward(self, x: torch.Tensor, split: bool = False) -> ModelOutput:
        nets = self.networks()
        xs = [net.stem(x) for net in nets]
        for j, alpha in enumerate(self.stitches):
            xs = stitch(alpha, [net.stages[j](h) for net, h in zip(nets, xs)], self.backbone.channel_dim)
        trunk = torch.stack([net.pool(h) for net, h in zip(nets, xs)], 1)
        (shared,) = self.cut(trunk, split=split)
        mixed = stitch(self.final_stitch, shared.unbind(1))
        logits = {name: head(z) for name, head, z in zip(self.task_names, self.heads, mixed)}
        return ModelOutput(logits, (shared,), (trunk,))
