"""The balancing interface.

Each training step the trainer hands a method the per-task losses and a StepContext holding the
shared representation (the tensor all tasks flow through), the shared (trunk) and task-specific
parameters, and an `all_reduce` hook. The method performs the backward pass itself: a loss-weighting
method back-propagates one weighted sum; a gradient method may differentiate each loss with respect
to `shared` (feature space) or the shared parameters, combine, then back-propagate once through the
trunk. Methods are nn.Modules so learnable weights join the optimiser and the checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..registry import METHODS, Spec
from ..tasks import Task



@dataclasses.dataclass
class StepContext:
    """What a method may use in one step.

    `shared` holds the tensors the task-specific modules read from the trunk (one for hard sharing;
    several for architectures such as MTAN that branch at every stage), each with the batch first.
    `trunk` holds the same tensors on the trunk's side of the cut (they differ when the model split
    the graph there, see `Architecture.split_shared`); back-propagating into `trunk` reaches every
    shared parameter exactly once.
    """

    shared: tuple[torch.Tensor, ...]
    shared_params: list[nn.Parameter]
    task_params: list[nn.Parameter]
    step: int
    epoch: int
    # Sums a tensor across data-parallel ranks (identity on one process): methods that need
    # cross-rank statistics (e.g. a task Gramian) call it so every rank computes the same weights.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    trunk: Optional[tuple[torch.Tensor, ...]] = None  # None: the same tensors as `shared`
    world_size: int = 1  # data-parallel ranks `all_reduce` sums over

    def __post_init__(self) -> None:
        if isinstance(self.shared, torch.Tensor):
            self.shared = (self.shared,)
        if self.trunk is None:
            self.trunk = self.shared
        elif isinstance(self.trunk, torch.Tensor):
            self.trunk = (self.trunk,)

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged across data-parallel ranks (`t` itself on one process)."""
        return t if self.world_size == 1 else self.all_reduce(t) / self.world_size

    def shared_matrix(self) -> torch.Tensor:
        """The shared tensors, detached, as one (B, D) matrix (each flattened per example)."""
        return torch.cat([s.detach().reshape(len(s), -1) for s in self.shared], 1)


class Balancer(nn.Module):
    """Base class. `backward` runs the backward pass and returns the task weights it applied."""

    # Gramian of the last step's per-task gradients (methods that compute one), for telemetry
    gramian: Optional[torch.Tensor] = None
    # True for methods that differentiate each loss with respect to `StepContext.shared`: the
    # trainer then asks the model to split its graph there (see `Architecture.split_shared`)
    needs_shared_features: bool = False
    # True for methods whose `backward` leaves the shared parameters' gradients already averaged over
    # data-parallel ranks (parameter-space gradient methods average J): the trainer averages the rest
    shared_grads_reduced: bool = False

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        """Called after each training epoch with the epoch's mean task losses (e.g. for DWA)."""

    def extra_state(self) -> dict[str, Any]:
        """Non-parameter state to checkpoint (histories, step counters)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


def gradient_stats(gramian: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """Per-task gradient norms and pairwise cosine similarities, read off G = J Jᵀ."""
    g = gramian.detach().double().cpu()
    norms = g.diagonal().clamp(min=0).sqrt()
    cos = g / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    return {"norm": {n: norms[i].item() for i, n in enumerate(names)},
            "cosine": {f"{a}|{b}": cos[i, j].item() for i, a in enumerate(names)
                       for j, b in enumerate(names) if i < j}}


def build_balancer(spec: Spec | dict[str, Any], tasks: list[Task]) -> Balancer:
    """The balancing method a spec (or a mapping with its `method`) describes, for `tasks`."""
    return METHODS.build(METHODS.spec(spec, "balancing"), tasks)
