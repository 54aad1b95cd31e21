"""A small VGG-style CNN for 28-36 px digits and sketches."""
from __future__ import annotations

import dataclasses

from torch import nn

from ...registry import BACKBONES
from .base import Backbone


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
def smallcnn(p: SmallCnnParams, in_channels: int, image_size: int, load_weights: bool = True) -> Backbone:
    """Small VGG-style CNN for 28-36 px digits and sketches (3 stages of two 3x3 convs)."""
    w = p.width
    stem = nn.Identity()
    stages = [_conv_block(in_channels, w), nn.Sequential(nn.MaxPool2d(2), _conv_block(w, 2 * w)),
              nn.Sequential(nn.MaxPool2d(2), _conv_block(2 * w, 4 * w))]
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(p.pooled_size), nn.Flatten(), nn.Dropout(p.dropout),
                         nn.Linear(4 * w * p.pooled_size**2, p.out_dim), nn.ReLU(inplace=True))
    return Backbone(stem, stages, pool, p.out_dim, input_shape=(in_channels, image_size))
