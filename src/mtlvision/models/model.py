"""Assemble backbone + architecture + heads from the model config."""
from __future__ import annotations

from ..config import ModelConfig
from ..tasks import Task
from .architectures import ARCHITECTURES, Architecture
from .backbones import build_backbone
from .heads import HEADS

MultiTaskModel = Architecture


def build_model(cfg: ModelConfig, tasks: list[Task], image_shape: tuple[int, int, int]) -> Architecture:
    """Build the network for `tasks` on images of shape (H, W, C)."""
    h, _, c = image_shape
    backbone = build_backbone(cfg.backbone, in_channels=c, image_size=h)
    spec = dict(cfg.architecture)
    name = spec.pop("name", "task-features")
    params = ARCHITECTURES.parse_params(name, spec, "model.architecture")
    head = dict(cfg.head)
    head_name = head.get("name", "linear")
    HEADS.parse_params(head_name, {k: v for k, v in head.items() if k != "name"}, "model.head")
    return ARCHITECTURES.build(name, params, backbone, tasks, head)
