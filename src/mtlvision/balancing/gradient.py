"""Gradient methods: per-task gradients -> one combined update of the trunk.

    objectives = transform(losses)                  loss transform (identity; DB-MTL: log(L_t + eps))
    J = space.jacobian(objectives), G = J Jᵀ        feature or parameter space (spaces.py)
    combination = combine(TaskGradients(J, G, ...))  the method
    space.apply(combination.update)                 one update d of the trunk

Families of `combine`:

* `GramianWeighting`: w = f(G) and d = Jᵀw. Set `solver` (a function of G alone, e.g. MGDA), implement
  `weights(G, ctx) -> w` (CAGrad's `c`, PCGrad's keyed draws), or, for a method with state (GradVac's
  EMA), `step(G, ctx) -> (w, next state)` with the state declared in `__init__`. The method never knows
  which space it runs in.
* Jacobian aggregators (GradDrop, DB-MTL: d = f(J)) and methods that read more than G (GradNorm reads the
  loss values and learns its weights) implement `combine` itself and return a `Combination`: the update,
  the reported weights, optional per-task scales for the task-specific gradients, the next state, and the
  gradients of the method's own parameters (written to `.grad` by `backward`, never as a side effect).

`spaces` lists the spaces a method supports; `space` in the method's parameters picks one of them.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import torch

from ..errors import ConfigError
from ..tasks import Task
from .base import GRADIENT_EITHER, Balancer, State
from .context import StepContext
from .spaces import SPACES, GradientSpace


@dataclasses.dataclass
class GradientParams:
    space: Literal["feature", "parameter"] = "feature"


@dataclasses.dataclass
class SeededParams(GradientParams):
    seed: Optional[int] = None  # default: the run's seed


@dataclasses.dataclass
class TaskGradients:
    """What a gradient method combines in one step."""

    matrix: torch.Tensor  # J (T, N): row t is ∇ of objective t in the method's space
    gramian: torch.Tensor  # G = J Jᵀ of the global batch (T, T)
    losses: torch.Tensor  # (T,) float64 values of the (untransformed) task losses, global batch


@dataclasses.dataclass
class Combination:
    """A gradient method's result for one step."""

    update: torch.Tensor  # d (N,), what the trunk receives
    weights: torch.Tensor  # (T,) reported task weights
    task_scale: Optional[torch.Tensor] = None  # per-task factors of the task-specific gradients (None: 1)
    state: State = dataclasses.field(default_factory=dict)  # next values of declared state
    own_grads: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # by parameter name


class GradientMethod(Balancer):
    """Base of gradient methods: implement `combine` (or derive from `GramianWeighting`)."""

    cost_class = GRADIENT_EITHER
    spaces: tuple[str, ...] = ("feature", "parameter")

    def __init__(self, p: GradientParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if p.space not in self.spaces:
            raise ConfigError(f"balancing.space: {type(self).__name__} works in {' or '.join(self.spaces)} "
                              f"space, got {p.space!r}")
        self.space = p.space
        self.gramian: Optional[torch.Tensor] = None  # last step's G, for telemetry

    @property
    def gradient_space(self) -> GradientSpace:
        return SPACES[self.space]

    @property
    def needs_shared_features(self) -> bool:  # type: ignore[override]
        """True when the method differentiates the losses with respect to the shared tensors."""
        return self.gradient_space.needs_shared_features

    @property
    def shared_grads_reduced(self) -> bool:  # type: ignore[override]
        """Parameter space: the trunk update comes from the rank-averaged J, so it is global already."""
        return self.gradient_space.shared_grads_reduced

    def transform(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-task objectives whose gradients are combined (the losses themselves by default)."""
        return losses

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        names, space = self.task_names, self.gradient_space
        values = torch.stack([losses[n].detach().reshape(()) for n in names]).double()
        objectives = self.transform(losses)
        jac = space.jacobian([objectives[n] for n in names], ctx)
        gramian = space.gramian(jac.matrix, ctx)
        self.gramian = gramian.detach()
        result = self.combine(TaskGradients(jac.matrix, gramian, values), ctx)
        space.apply(result.update, ctx)
        space.apply_task_grads(jac, result.task_scale)
        self.commit(result.state)
        self.write_grads(result.own_grads)
        return dict(zip(names, result.weights.tolist()))


class GramianWeighting(GradientMethod):
    """w = f(G), d = Jᵀw: set `solver` (a function of G alone), or implement `weights(G, ctx)` (weights that
    also depend on the method's parameters or the step) or, with state, `step(G, ctx)`."""

    solver: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # Leave out tasks absent from the batch (loss exactly 0: no labelled row, as the loss-weighting methods
    # define it), for stateless methods whose solution a zero gradient would collapse: weight 0, the others
    # solved among themselves.
    skip_absent: bool = False

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        if self.solver is None:
            raise NotImplementedError(f"{type(self).__name__}: set `solver` or implement `weights` or `step`")
        return self.solver(G)

    def step(self, G: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, State]:
        """This step's weights and the next state (a function of G, the current state and ctx)."""
        return self.weights(G, ctx), {}

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        present = (grads.losses != 0).nonzero().squeeze(-1) if self.skip_absent else None
        if present is None or len(present) in (0, len(grads.losses)):
            w, state = self.step(grads.gramian, ctx)
        else:
            idx = present.to(grads.gramian.device)
            sub, state = self.step(grads.gramian[idx][:, idx], ctx)
            w = sub.new_zeros(len(grads.losses)).index_copy(0, idx.to(sub.device), sub)
        w = w.to(grads.matrix.dtype)
        return Combination(w @ grads.matrix, w, state=state)


