"""MTAN: task-specific soft-attention modules on every stage of one shared backbone."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, Architecture, ModelOutput


@dataclasses.dataclass
class MtanParams:
    reduction: int = 1  # attention bottleneck: g maps to C_j / reduction channels (1 = the paper's SegNet)

    def __post_init__(self) -> None:
        if self.reduction < 1:
            raise ConfigError(f"model.architecture.reduction: expected >= 1, got {self.reduction}")


def _attention(in_channels: int, mid: int, out_channels: int) -> nn.Sequential:
    """h(g(.)): 1x1 conv-BN-ReLU, then 1x1 conv-BN-sigmoid (the paper's task-specific mask layers)."""
    return nn.Sequential(nn.Conv2d(in_channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.Sigmoid())


def _extractor(in_channels: int, out_channels: int) -> nn.Sequential:
    """f: 3x3 conv-BN-ReLU taking one stage's attended features to the next stage's channels."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _token_attention(in_channels: int, mid: int, out_channels: int) -> nn.Sequential:
    """h(g(.)) on tokens (B, N, C): the same per-position layers, Linear + LayerNorm in place of 1x1 conv + BN."""
    return nn.Sequential(nn.Linear(in_channels, mid, bias=False), nn.LayerNorm(mid), nn.ReLU(inplace=True),
                         nn.Linear(mid, out_channels, bias=False), nn.LayerNorm(out_channels), nn.Sigmoid())


def _token_extractor(in_channels: int, out_channels: int) -> nn.Sequential:
    """f on tokens: Linear + LayerNorm + ReLU per token (the blocks themselves mix the tokens)."""
    return nn.Sequential(nn.Linear(in_channels, out_channels, bias=False), nn.LayerNorm(out_channels),
                         nn.ReLU(inplace=True))


@ARCHITECTURES.register("mtan", params=MtanParams)
class Mtan(Architecture):
    r"""MTAN (Liu, Johns & Davison, CVPR 2019): per-task attention masks over every backbone stage.

    With p_j the output of stage j of the shared backbone (j = 1..J) and T tasks:

        â_t^1 = σ(h_t^1(g_t^1(p_1))) ⊙ p_1
        â_t^j = σ(h_t^j(g_t^j([p_j ; pool(f^j(â_t^{j-1}))]))) ⊙ p_j          j > 1
        y_t   = head_t(backbone.pool(â_t^J))

    g, h: 1x1 conv + BN (ReLU, sigmoid), one pair per task and stage; f^j: 3x3 conv + BN + ReLU to
    stage j's channels, shared by the tasks as in the paper ("a shared feature extractor"), then an
    adaptive max-pool to stage j's resolution. Differences from the paper: stages are opaque here,
    so the mask is computed from and applied to the stage output p_j (the paper reads u^j from the
    block's first layer and masks the last one, p^j); the stage channel counts are probed with one
    dummy forward, so any registered backbone works.

    Token backbones (vision transformers, stage outputs (B, N, C) with N constant): a stage is a group
    of consecutive blocks; g and h are per-token Linear + LayerNorm (the 1x1 convolutions' analogue), so
    each task's mask weighs every channel of every token, class token included; f is a per-token
    Linear + LayerNorm + ReLU and needs no pooling (N does not change).

    Pooling: the backbone's own `pool` is applied to each task's attended map (parameter-free for
    ResNet; smallcnn's pool ends in a Linear layer, which the tasks share, like f), so the feature
    vector the heads read has the backbone's `out_dim` and the model adds only the attention modules
    to hard sharing's parameters.

    Cut: the trunk is the backbone's stem and stages; the shared tensors are the J stage outputs
    (what the attention modules read). Attention modules, f, the backbone's pool and the heads are
    downstream: task-specific (f and pool receive the plain sum of the task gradients).
    """

    def __init__(self, p: MtanParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks)
        backbone.require_stages("mtan")
        channels = backbone.stage_channels()
        spatial = backbone.layout == "spatial"
        attention, extractor = (_attention, _extractor) if spatial else (_token_attention, _token_extractor)
        self.attention = nn.ModuleList([
            nn.ModuleList([attention(c if j == 0 else 2 * c, max(1, c // p.reduction), c) for _ in tasks])
            for j, c in enumerate(channels)])
        self.extractors = nn.ModuleList([extractor(cin, cout) for cin, cout in zip(channels, channels[1:])])
        self.heads = nn.ModuleList([build_head(head, backbone.out_dim, t.num_classes) for t in tasks])

    def shared_parameters(self) -> list[nn.Parameter]:
        """Stem and stages: the backbone's pool reads task-attended features, so it is task-side."""
        return [*self.backbone.stem.parameters(), *self.backbone.stages.parameters()]

    def forward(self, x: torch.Tensor, split: bool = False) -> ModelOutput:
        x = self.backbone.stem(x)
        trunk = []
        for stage in self.backbone.stages:
            x = stage(x)
            trunk.append(x)
        shared = self.cut(*trunk, split=split)
        attended: list[torch.Tensor] = []
        for j, (feat, masks) in enumerate(zip(shared, self.attention)):
            if j == 0:
                attended = [mask(feat) * feat for mask in masks]
                continue
            prev = [self.extractors[j - 1](a) for a in attended]
            if self.backbone.layout == "spatial" and prev[0].shape[-2:] != feat.shape[-2:]:
                prev = [F.adaptive_max_pool2d(a, feat.shape[-2:]) for a in prev]
            attended = [mask(torch.cat([feat, a], self.backbone.channel_dim)) * feat for mask, a in zip(masks, prev)]
        logits = {name: head(self.backbone.pool(a))
                  for name, head, a in zip(self.task_names, self.heads, attended)}
        return ModelOutput(logits, shared, tuple(trunk))
