"""The backbone interface: a shared trunk mapping images (B, C, H, W) to a feature vector (B, out_dim).

Every backbone has the same shape, `stem` -> `stages` (a ModuleList) -> `pool`, so an architecture
that needs to act between stages (MTAN, cross-stitch, the mixture-of-experts family) is written once
for all backbones. A backbone whose weights were trained on normalised inputs (pretrained ones)
declares that normalisation in `normalization`; None means "standardise with the dataset's own
per-channel statistics" (from-scratch backbones).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ...registry import BACKBONES, Spec


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation (x / 255 - mean) / std on the 0..1 scale, and where it comes from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # e.g. "timm pretrained_cfg of efficientnet_lite0", "torchvision IMAGENET1K_V1"


class Backbone(nn.Module):
    """stem -> stages -> pool; `out_dim` is the size of the pooled feature vector."""

    out_dim: int

    def __init__(self, stem: nn.Module, stages: list[nn.Module], pool: nn.Module, out_dim: int,
                 normalization: Optional[Normalization] = None) -> None:
        super().__init__()
        self.stem, self.stages, self.pool, self.out_dim = stem, nn.ModuleList(stages), pool, out_dim
        self.normalization = normalization

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)

    def stage_channels(self, probe_size: int = 64) -> list[int]:
        """Channels of each stage's output, probed with one dummy forward in eval mode (running
        statistics untouched); for architectures that build modules between the stages."""
        conv = next((m for m in self.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is None:
            raise TypeError("stage_channels: the backbone has no Conv2d to read its input channels from")
        x = torch.zeros(2, conv.in_channels, probe_size, probe_size, device=conv.weight.device,
                        dtype=conv.weight.dtype)
        was_training, channels = self.training, []
        self.eval()
        with torch.no_grad():
            x = self.stem(x)
            for stage in self.stages:
                x = stage(x)
                channels.append(x.shape[1])
        self.train(was_training)
        return channels


def build_backbone(spec: Spec | dict, in_channels: int, image_size: int, load_weights: bool = True) -> Backbone:
    """The backbone a spec (or a mapping with its `name`) describes, for images of `in_channels` x `image_size`².

    `load_weights=False` builds a pretrained backbone's architecture without fetching its weights (the
    caller loads a checkpoint's state dict instead); its declared normalisation is the same.
    """
    return BACKBONES.build(BACKBONES.spec(spec, "model.backbone"), in_channels, image_size, load_weights=load_weights)
