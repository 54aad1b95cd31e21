"""Assemble backbone + architecture + heads from the model config."""
from __future__ import annotations

from ..config import ModelConfig
from ..tasks import Task
from .architectures import ARCHITECTURES, Architecture
from .backbones import build_backbone


def build_model(cfg: ModelConfig, tasks: list[Task], image_shape: tuple[int, int, int],
                pretrained: bool = True) -> Architecture:
    """Build the network for `tasks` on images of shape (H, W, C).

    `pretrained=False` skips downloading backbone weights (the caller loads a state dict anyway).
    """
    h, _, c = image_shape
    backbone_spec = dict(cfg.backbone)
    if not pretrained:
        backbone_spec.pop("pretrained", None)
    backbone = build_backbone(backbone_spec, in_channels=c, image_size=h)
    spec = dict(cfg.architecture)
    name = spec.pop("name", "task-features")
    params = ARCHITECTURES.parse_params(name, spec, "model.architecture")
    return ARCHITECTURES.build(name, params, backbone, tasks, dict(cfg.head))
