"""Loss weighting: each step is one backward pass of a scalar built from the task losses.

A method implements `objective(losses, ctx) -> Objective`: the scalar to back-propagate, the weight each
task's loss received (the coefficient of ∇L_t in the gradient that reaches the network, reported for
telemetry) and, for methods with declared state, the next state. `LossWeighting.backward` does the
backward pass and commits the state; methods never call `.backward()` themselves.

Absent tasks. A task whose loss is exactly 0 in a batch (`Task.loss` returns 0 when no sample of the
batch is labelled for it) carries no information about the task. The adaptive methods treat such a task
as absent for that step: it contributes no term (so no log(0), no 1/0 and no learnable scale driven by a
regulariser alone), its reported weight is finite, and the other tasks are weighted exactly as the method
would weight them without it. Each method's docstring says what this means for it.
"""
from __future__ import annotations

import dataclasses

import torch

from .base import ONE_BACKWARD, Balancer, State, as_weights
from .context import StepContext


@dataclasses.dataclass
class Objective:
    """A loss-weighting step: `total` is back-propagated once."""

    total: torch.Tensor  # the scalar
    weights: torch.Tensor  # (T,) reported task weights, in task order
    state: State = dataclasses.field(default_factory=dict)  # next values of declared state


def stack_losses(losses: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The task losses as one (T,) tensor in task order (keeps the graph)."""
    missing = [n for n in names if n not in losses]
    if missing:
        raise KeyError(f"losses for task(s) {missing} are missing; got {sorted(losses)}")
    return torch.stack([losses[n].reshape(()) for n in names])


class LossWeighting(Balancer):
    """Base of loss-weighting methods: implement `objective`."""

    cost_class = ONE_BACKWARD

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        step = self.objective(losses, ctx)
        step.total.backward()
        self.commit(step.state)
        return as_weights(self.task_names, step.weights)
