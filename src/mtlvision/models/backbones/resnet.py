"""ResNet-18 from torchvision, with a width multiplier and a CIFAR stem for small images."""
from __future__ import annotations

import dataclasses
from typing import Literal

from torch import nn
from torchvision.models import ResNet18_Weights
from torchvision.models.resnet import BasicBlock, ResNet

from ...errors import ConfigError
from ...registry import BACKBONES
from .base import Backbone, Normalization
from .weights import torchvision_state_dict


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
def resnet18(p: ResNetParams, in_channels: int, image_size: int, load_weights: bool = True) -> Backbone:
    """torchvision ResNet-18; CIFAR stem (3x3 conv, no max-pool) for inputs <= 64 px; width multiplier."""
    if p.width <= 0:
        raise ConfigError(f"model.backbone.width: expected > 0, got {p.width}")
    cifar = p.stem == "cifar" or (p.stem == "auto" and image_size <= 64)
    if p.pretrained and (p.width != 1.0 or cifar or in_channels != 3):
        raise ConfigError("model.backbone.pretrained needs width 1.0, stem imagenet and 3 input channels")
    net = _WideResNet18(p.width, cifar, in_channels, p.zero_init_residual, p.init)
    norm = None
    if p.pretrained:
        weights = ResNet18_Weights.IMAGENET1K_V1
        if load_weights:
            net.load_state_dict(torchvision_state_dict(weights, "model.backbone.pretrained"))
        t = weights.transforms()
        norm = Normalization(tuple(t.mean), tuple(t.std), "torchvision ResNet18_Weights.IMAGENET1K_V1")
    return Backbone(*resnet_parts(net), net.out_dim, norm, input_shape=(in_channels, image_size))


def resnet_parts(net: ResNet) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """stem (conv1, bn1, relu, maxpool), stages (layer1..layer4) and pool of a torchvision ResNet."""
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return stem, [net.layer1, net.layer2, net.layer3, net.layer4], nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
