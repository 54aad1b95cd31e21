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

from ..errors import ConfigError
from ..registry import Registry
from ..tasks import Task

METHODS: Registry = Registry("balancing method")


@dataclasses.dataclass
class StepContext:
    shared: torch.Tensor
    shared_params: list[nn.Parameter]
    task_params: list[nn.Parameter]
    step: int
    epoch: int
    # Sums a tensor across data-parallel ranks (identity on one process): methods that need
    # cross-rank statistics (e.g. a task Gramian) call it so every rank computes the same weights.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t


class Balancer(nn.Module):
    """Base class. `backward` runs the backward pass and returns the task weights it applied."""

    # Gramian of the last step's per-task gradients (methods that compute one), for telemetry
    gramian: Optional[torch.Tensor] = None

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


def build_balancer(spec: dict[str, Any], tasks: list[Task], where: str = "balancing") -> Balancer:
    spec = dict(spec)
    name = spec.pop("method", None)
    if name is None:
        raise ConfigError(f"{where}.method: required key is missing; valid: {', '.join(METHODS.names())}")
    params: Optional[Any] = METHODS.parse_params(name, spec, where)
    return METHODS.build(name, params, tasks)
