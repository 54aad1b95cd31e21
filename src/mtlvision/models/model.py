"""Assemble backbone + architecture + heads from the model config."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import ARCHITECTURES
from ..tasks import Task
from .architectures import Architecture
from .backbones import build_backbone

if TYPE_CHECKING:
    from ..config import ModelConfig


def build_model(cfg: "ModelConfig", tasks: list[Task], image_shape: tuple[int, int, int],
                load_weights: bool = True) -> Architecture:
    """Build the network for `tasks` on images of shape (H, W, C).

    `load_weights=False` builds a pretrained backbone without fetching its weights (the caller loads a
    checkpoint's state dict anyway).
    """
    h, _, c = image_shape
    backbone = build_backbone(cfg.backbone, in_channels=c, image_size=h, load_weights=load_weights)
    return ARCHITECTURES.build(cfg.architecture, backbone, tasks, cfg.head)
