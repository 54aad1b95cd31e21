"""torchvision classification models as backbones: `{name: torchvision, model: resnet50, weights: IMAGENET1K_V2}`.

The model comes from `torchvision.models.get_model`, its weights from a weights enum (`get_model_weights`,
downloaded once into torch's cache by torchvision) or a local file; the enum's `transforms()` give the
input normalisation. Families mtlvision cuts into stem -> stages -> pool:

* ResNet, ResNeXt, Wide ResNet: stem conv1..maxpool, stages layer1..layer4;
* RegNet: stem, stages the trunk's blocks;
* EfficientNet, MobileNetV2/V3, ConvNeXt (`features` + `classifier`): stem `features[0]` with the
  modules after it at stride 2, stages the following `features` modules grouped by output resolution
  (the last one keeps the final 1x1 convolution), pool = global average pool and the classifier up to
  its last Linear (MobileNetV3's hidden layer, ConvNeXt's LayerNorm).

The cut is checked once on a probe batch against the model's own forward (last Linear removed). Other
torchvision models (VGG, ViT, Swin, ...) are refused: timm has them (`name: timm`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import BACKBONES
from .base import Backbone, Normalization
from .resnet import resnet_parts
from .weights import LoadReport, load_checked, read_state_dict, torchvision_state_dict, weights_path

WHERE = "model.backbone"
_FEATURES = ("EfficientNet", "MobileNetV2", "MobileNetV3", "ConvNeXt")
SUPPORTED = ("ResNet", "RegNet", *_FEATURES)


@dataclasses.dataclass
class TorchvisionParams:
    model: str = ""  # a torchvision.models classification model: resnet50, efficientnet_b0, convnext_tiny, ...
    weights: Optional[str] = None  # a weights enum member (IMAGENET1K_V2, DEFAULT) or a local weights file
    mean: Optional[list[float]] = None  # input normalisation of the weights (default: the enum's transforms)
    std: Optional[list[float]] = None

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"{WHERE}.mean/std: set both or neither")
        if self.std is not None and (not self.std or min(self.std) <= 0 or len(self.std) != len(self.mean)):
            raise ConfigError(f"{WHERE}.std: expected one positive value per mean value, got {self.std}")


def _model(name: str) -> nn.Module:
    import difflib

    from torchvision.models import get_model, list_models

    names = list_models()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{WHERE}.model: torchvision has no model {name!r}{hint} (list them: mtlvision list "
                          "backbones --torchvision)")
    return get_model(name)


def _weights_enum(name: str, value: Optional[str]) -> Any:
    """The weights enum member `value` names, or None for no weights or a file path."""
    from torchvision.models import get_model_weights

    if value is None:
        return None
    members = get_model_weights(name).__members__
    if value in members:
        return members[value]
    if value.isidentifier() and value.upper() == value:
        raise ConfigError(f"{WHERE}.weights: torchvision has no weights {value!r} for {name}; it has "
                          f"{', '.join(members)} (or give a local file's path)")
    return None


def _parts(net: nn.Module, probe: torch.Tensor) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    kind = type(net).__name__
    if kind == "ResNet":
        return resnet_parts(net)
    if kind == "RegNet":
        return net.stem, list(net.trunk_output), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = list(net.classifier)[:-1]
    flatten = [] if any(isinstance(m, nn.Flatten) for m in head) else [nn.Flatten()]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *flatten, *head)
    items, sizes, x = list(net.features), [], probe
    with torch.no_grad():
        for module in items:
            x = module(x)
            sizes.append(x.shape[-1])
    k = 1  # the stem: features[0] and the modules after it still at stride <= 2
    while k < len(items) and probe.shape[-1] / sizes[k] <= 2:
        k += 1
    groups = [items[:k]]
    for i in range(k, len(items)):
        if len(groups) > 1 and sizes[i] == sizes[i - 1]:
            groups[-1].append(items[i])
        else:
            groups.append([items[i]])
    stem, *stages = [nn.Sequential(*g) for g in groups]
    return stem, stages, pool


def _first_conv(net: nn.Module, in_channels: int) -> None:
    """Give the first convolution `in_channels` inputs, its weights adapted by timm's `adapt_input_conv`
    (summed over RGB for one channel), pretrained or not."""
    from timm.models import adapt_input_conv

    name, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_channels, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent), child, new)


def _normalization(p: TorchvisionParams, enum: Any, in_channels: int) -> Optional[Normalization]:
    from torchvision.models import get_model_weights

    if p.mean is not None:
        return Normalization(tuple(p.mean), tuple(p.std), f"{WHERE}.mean/std").for_channels(in_channels)
    if p.weights is None:
        return None
    source = f"torchvision {type(enum).__name__}.{enum.name}" if enum is not None else ""
    if enum is None:
        enum = get_model_weights(p.model).DEFAULT
        source = (f"torchvision {type(enum).__name__}.{enum.name}, assumed for the weights file {p.weights} "
                  f"(set {WHERE}.mean and std if it was trained with another normalisation)")
    t = enum.transforms()
    return Normalization(tuple(t.mean), tuple(t.std), source).for_channels(in_channels)


@BACKBONES.register("torchvision", params=TorchvisionParams)
def torchvision_backbone(p: TorchvisionParams, in_channels: int, image_size: int,
                         load_weights: bool = True) -> Backbone:
    """A torchvision model (ResNet, RegNet, EfficientNet, MobileNet, ConvNeXt) with its weights enum or a local file."""
    if not p.model:
        raise ConfigError(f"{WHERE}.model: required: a torchvision model name such as resnet50 (list them: "
                          "mtlvision list backbones --torchvision)")
    net = _model(p.model)
    if type(net).__name__ not in SUPPORTED:
        raise ConfigError(f"{WHERE}.model: mtlvision cuts torchvision's {', '.join(SUPPORTED)} models into stages, "
                          f"not {p.model} ({type(net).__name__}); timm has it or its kin: name: timm")
    enum = _weights_enum(p.model, p.weights)
    normalization = _normalization(p, enum, in_channels)
    report: Optional[LoadReport] = None
    if p.weights is not None and load_weights:
        where = f"{WHERE}.weights"
        if enum is not None:
            net.load_state_dict(torchvision_state_dict(enum, where))
            report = LoadReport(f"torchvision {type(enum).__name__}.{enum.name} ({enum.url})", len(net.state_dict()))
        else:
            path = weights_path(p.weights, where)
            report = load_checked(net, read_state_dict(path, where), str(path), where)
    if in_channels != 3:
        _first_conv(net, in_channels)
    net.eval()
    probe = torch.randn(2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    stem, stages, pool = _parts(net, probe)
    backbone = Backbone(stem, stages, pool, 0, normalization, input_shape=(in_channels, image_size))
    last = net.fc if hasattr(net, "fc") else net.classifier[-1]
    with torch.no_grad():
        want = backbone(probe)
        last_in = []
        handle = last.register_forward_pre_hook(lambda _m, args: last_in.append(args[0]))
        net(probe)
        handle.remove()
    if not torch.allclose(want, last_in[0], rtol=1e-4, atol=1e-5):
        raise ConfigError(f"{WHERE}.model: the stages mtlvision cut {p.model} into do not reproduce its forward pass")
    backbone.out_dim, backbone.weights_report = want.shape[1], report
    return backbone.train()
