"""Backbones: shared trunks mapping images (B,C,H,W) to a feature vector (B, out_dim).

Every backbone has the same shape, `stem` -> `stages` (a ModuleList) -> `pool`, so an architecture
that needs to act between stages can be written once for all backbones.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.resnet import BasicBlock, ResNet

from ..errors import ConfigError
from ..registry import Registry

BACKBONES: Registry = Registry("backbone")


class Backbone(nn.Module):
    """stem -> stages -> pool; `out_dim` is the size of the pooled feature vector."""

    out_dim: int

    def __init__(self, stem: nn.Module, stages: list[nn.Module], pool: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.stem, self.stages, self.pool, self.out_dim = stem, nn.ModuleList(stages), pool, out_dim

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


@dataclasses.dataclass
class ResNetParams:
    width: float = 1.0  # channel multiplier (1.0 = torchvision's 64-128-256-512)
    stem: Literal["auto", "cifar", "imagenet"] = "auto"  # auto: cifar for inputs <= 64 px
    pretrained: bool = False  # torchvision ImageNet weights (width 1, imagenet stem; downloads once)
    zero_init_residual: bool = True  # each block's last BN weight starts at 0 (its residual branch is off)
    # torchvision: Kaiming-normal fan-out convolutions, as torchvision's ResNet; pytorch: every layer's own
    # default (Kaiming-uniform, a=sqrt(5)), whose 1.7-2.4x smaller conv weights train faster under
    # BatchNorm (a scale-invariant weight's effective step grows as its norm shrinks)
    init: Literal["torchvision", "pytorch"] = "torchvision"


class _WideResNet18(ResNet):
    """torchvision's ResNet-18 with every stage's width scaled and an optional CIFAR stem."""

    def __init__(self, width: float, cifar_stem: bool, in_channels: int, zero_init_residual: bool,
                 init: str) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], zero_init_residual=zero_init_residual)
        self.out_dim = 512
        if width == 1.0 and not cifar_stem and in_channels == 3:
            if init == "pytorch":  # torchvision's __init__ has applied its own scheme already
                self._init(init, zero_init_residual)
            return
        widths = [max(4, int(round(64 * width * m))) for m in (1, 2, 4, 8)]
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(BasicBlock, widths[0], 2)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 2, stride=2)
        self.out_dim = widths[3]
        self._init(init, zero_init_residual)

    def _init(self, init: str, zero_init_residual: bool) -> None:
        """(Re-)initialise every layer: torchvision's scheme or each layer's PyTorch default."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "torchvision":
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                else:
                    m.reset_parameters()
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)


@BACKBONES.register("resnet18", params=ResNetParams)
def resnet18(p: ResNetParams, in_channels: int, image_size: int) -> Backbone:
    """torchvision ResNet-18; CIFAR stem (3x3 conv, no max-pool) for inputs <= 64 px; width multiplier."""
    if p.width <= 0:
        raise ConfigError(f"model.backbone.width: expected > 0, got {p.width}")
    cifar = p.stem == "cifar" or (p.stem == "auto" and image_size <= 64)
    if p.pretrained and (p.width != 1.0 or cifar or in_channels != 3):
        raise ConfigError("model.backbone.pretrained needs width 1.0, stem imagenet and 3 input channels")
    net = _WideResNet18(p.width, cifar, in_channels, p.zero_init_residual, p.init)
    if p.pretrained:
        net.load_state_dict(ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=True))
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Backbone(stem, [net.layer1, net.layer2, net.layer3, net.layer4], pool, net.out_dim)


@dataclasses.dataclass
class SmallCnnParams:
    width: int = 32  # channels of the first stage; doubled at each of the 3 stages
    out_dim: int = 256
    pooled_size: int = 3  # spatial grid kept before the linear layer (keeps "where" information)
    dropout: float = 0.0


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@BACKBONES.register("smallcnn", params=SmallCnnParams)
def smallcnn(p: SmallCnnParams, in_channels: int, image_size: int) -> Backbone:
    """Small VGG-style CNN for 28-36 px digits and sketches (3 stages of two 3x3 convs)."""
    w = p.width
    stem = nn.Identity()
    stages = [_conv_block(in_channels, w), nn.Sequential(nn.MaxPool2d(2), _conv_block(w, 2 * w)),
              nn.Sequential(nn.MaxPool2d(2), _conv_block(2 * w, 4 * w))]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(p.pooled_size), nn.Flatten(), nn.Dropout(p.dropout),
                         nn.Linear(4 * w * p.pooled_size**2, p.out_dim), nn.ReLU(inplace=True))
    return Backbone(stem, stages, pool, p.out_dim)


def build_backbone(spec: dict, in_channels: int, image_size: int, where: str = "model.backbone",
                   ) -> Backbone:
    spec = dict(spec)
    name = spec.pop("name", "resnet18")
    params: Optional[object] = BACKBONES.parse_params(name, spec, where)
    return BACKBONES.build(name, params, in_channels, image_size)
