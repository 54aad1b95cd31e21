"""Architectures: how the tasks share the network above (or inside) the backbone.

An architecture returns, for a batch, each task's logits and the `shared` tensors: what its
task-specific modules read from the trunk (the backbone's feature vector for hard sharing; every
stage's output for MTAN). Every path from a shared parameter to a loss crosses them, so
feature-space balancing methods differentiate the losses there and back-propagate one combined
gradient into the trunk.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from ...registry import ARCHITECTURES as ARCHITECTURES  # re-exported to the architecture modules
from ...tasks import Task
from ..backbones import Backbone


# objectives (one per task, in task order) -> J (T, B x N): row t is objective t's gradient at the shared tensors,
# each flattened per example and concatenated, the whole flattened (the layout of `FeatureSpace.jacobian`)
TaskJacobian = Callable[[list[torch.Tensor]], torch.Tensor]


@dataclasses.dataclass
class ModelOutput:
    """What a forward pass gives the trainer.

    `task_jacobian`: optional, offered by an architecture whose per-task gradients at the shared tensors have
    a cheaper exact form than one autograd call per task (task-features: one backward to the heads' inputs,
    then a closed form through its sharing module). Only when the model was split at the cut (`cut`): the
    rows are gradients at the `shared` leaves; and not from a compiled forward (see `forward`). Valid only
    for objectives where objective t depends on the shared tensors through task t's own logits alone (each
    task's loss, or a function of it); it keeps the graph (the task-specific parameters are differentiated
    afterwards, `GradientSpace.apply_task_grads`).
    """

    logits: dict[str, torch.Tensor]
    shared: tuple[torch.Tensor, ...]  # what task-specific modules read from the trunk, batch first
    trunk: tuple[torch.Tensor, ...]  # the same tensors on the trunk's side (differ when split)
    task_jacobian: Optional[TaskJacobian] = None


class Architecture(nn.Module):
    """Base: a backbone plus task-specific modules; `shared_parameters()` are the trunk's.

    Heads live in a ModuleList in task order (task names such as "type" or "train" would clash
    with nn.ModuleDict's own attributes).
    """

    no_weight_decay: frozenset[str] = frozenset()  # parameter names the optimiser must not decay

    def __init__(self, backbone: Backbone, tasks: list[Task]) -> None:
        super().__init__()
        self.backbone = backbone
        self.task_names = [t.name for t in tasks]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The trunk: every parameter upstream of the shared tensors."""
        return list(self.backbone.parameters())

    @staticmethod
    def cut(*trunk: torch.Tensor, split: bool) -> tuple[torch.Tensor, ...]:
        """The tensors task-specific modules read in place of `trunk`.

        With `split` (training with a feature-space gradient method, see `forward`) they are detached
        leaf copies, so each loss can be differentiated with respect to every shared tensor directly,
        even when one shared tensor also feeds another; the combined gradient is then back-propagated
        into `trunk` once. Without it (or with gradients off) the graph stays whole."""
        if not Architecture.splits(split):
            return trunk
        return tuple(t.detach().requires_grad_() for t in trunk)

    @staticmethod
    def splits(split: bool) -> bool:
        """Whether `cut(..., split=split)` splits the graph (not with gradients off)."""
        return split and torch.is_grad_enabled()

    def task_parameters(self) -> list[nn.Parameter]:
        shared = {id(p) for p in self.shared_parameters()}
        return [p for p in self.parameters() if id(p) not in shared]

    def decode(self, shared: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def decode_at_cut(self, shared: torch.Tensor) -> tuple[dict[str, torch.Tensor], Optional[TaskJacobian]]:
        """`decode` of the split leaf `shared`, plus the architecture's `ModelOutput.task_jacobian` (None: the
        feature space takes one autograd call per task)."""
        return self.decode(shared), None

    def forward(self, x: torch.Tensor, split: bool = False) -> ModelOutput:
        """Each task's logits, and the shared tensors on both sides of the cut (`split`: see `cut`)."""
        trunk = (self.backbone(x),)
        shared = self.cut(*trunk, split=split)
        # compiled (torch.compile), the intermediates a closed form differentiates are outputs of one fused
        # autograd node, no longer on the path to the logits: not offered there
        if not self.splits(split) or torch.compiler.is_compiling():
            return ModelOutput(self.decode(shared[0]), shared, trunk)
        logits, jacobian = self.decode_at_cut(shared[0])
        return ModelOutput(logits, shared, trunk, jacobian)
