"""Task heads: map a task's input vector to its class logits."""
from __future__ import annotations

import dataclasses

from torch import nn

from ..registry import HEADS, Spec



@HEADS.register("linear")
def linear(in_dim: int, num_classes: int) -> nn.Module:
    """One linear layer."""
    return nn.Linear(in_dim, num_classes)


@dataclasses.dataclass
class MlpParams:
    hidden: int = 256
    dropout: float = 0.0


@HEADS.register("mlp", params=MlpParams)
def mlp(p: MlpParams, in_dim: int, num_classes: int) -> nn.Module:
    """Linear -> ReLU -> dropout -> linear."""
    return nn.Sequential(nn.Linear(in_dim, p.hidden), nn.ReLU(inplace=True), nn.Dropout(p.dropout),
                         nn.Linear(p.hidden, num_classes))


def build_head(spec: Spec | dict, in_dim: int, num_classes: int) -> nn.Module:
    """One task's head from its spec: `in_dim` features -> `num_classes` logits."""
    return HEADS.build(HEADS.spec(spec, "model.head"), in_dim, num_classes)
