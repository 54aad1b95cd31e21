"""Where per-task gradients are taken: feature space and parameter space, one interface.

A `GradientSpace` computes the per-task Jacobian J (T x N) of a step's objectives, the Gramian G = J Jᵀ of
the global batch, and applies a combined update d (N,) to the trunk. Gradient methods see only J, G and d,
never which space they run in.

* `feature` (default; "MGDA-UB", Sener & Koltun 2018): J holds each task's gradient with respect to
  the shared representation (B x D; where an architecture's tasks read several trunk tensors, e.g.
  MTAN's stage outputs, their per-example concatenation). It costs T backward passes through the
  task heads only, then ONE backward through the trunk with the combined gradient: close to the
  price of an equal-weight step.
  It balances what the trunk receives through the representation, an upper-bound surrogate of the
  exact parameter-space problem. In multi-input runs every task owns different rows of the
  representation, so cross-task inner products are zero there; use `parameter` to see conflicts.
* `parameter`: J holds each task's gradient with respect to every shared (trunk) parameter: exact,
  at the price of T backward passes through the trunk.

Task-specific parameters (heads, and modules that only task heads read) receive the sum of their own
tasks' gradients (scaled per task where a method asks for it, see `Combination.task_scale`).

Data parallel (N ranks, each loss a mean over the rank's rows): in feature space each rank holds its
own rows of the global J, scaled by 1/N, so the global G = Σ_r J_r J_rᵀ / N² is one all_reduce of
the T x T Gramian (`StepContext.all_reduce`); each rank then back-propagates its local combined
gradient and the trainer averages the trunk gradients. In parameter space the global J is the mean of
the ranks' J: it is averaged before G is formed, so the trunk update is already the global one
(`shared_grads_reduced`).

A faster way to take the T per-task gradients (e.g. one batched pass over the task heads for large T)
is a different `jacobian` of the same interface: the methods are unaffected.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from .context import StepContext


@dataclasses.dataclass
class Jacobian:
    """Per-task gradients of one step: the rows of J, and each task's task-specific gradients."""

    matrix: torch.Tensor  # (T, N); parameter space: averaged over ranks
    task_params: list[nn.Parameter]  # the task-specific parameters that require grad
    task_grads: list[list[Optional[torch.Tensor]]]  # [t][k]: ∂objective_t / ∂task_params[k] (None: unused)


def _accumulate(params: list[nn.Parameter], grads: list[Optional[torch.Tensor]]) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


def per_task_grads(objectives: list[torch.Tensor], wrt: list[torch.Tensor], ctx: StepContext, retain_last: bool,
                   flatten: Callable[[list[torch.Tensor]], torch.Tensor],
                   ) -> tuple[torch.Tensor, list[nn.Parameter], list[list[Optional[torch.Tensor]]]]:
    """One autograd pass per objective: J, whose row t is `flatten` of objective t's gradients with respect to
    `wrt` (zeros where unused), and its gradients with respect to the task-specific parameters that require
    grad (None where unused). The graph is kept for the next objective, and after the last one when
    `retain_last`."""
    task_params = [p for p in ctx.task_params if p.requires_grad]
    rows, task_grads = [], []
    for t, objective in enumerate(objectives):
        grads = torch.autograd.grad(objective, [*wrt, *task_params], allow_unused=True,
                                    retain_graph=retain_last or t < len(objectives) - 1)
        rows.append(flatten([g if g is not None else torch.zeros_like(x) for x, g in zip(wrt, grads[:len(wrt)])]))
        task_grads.append(list(grads[len(wrt):]))
    return torch.stack(rows), task_params, task_grads


class GradientSpace:
    """Interface: `jacobian`, `gramian`, `apply`; plus what the trainer must know about the space."""

    name: str
    needs_shared_features: bool  # the model must split its graph at the shared tensors
    shared_grads_reduced: bool  # `apply` leaves the trunk gradients averaged over ranks already

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        raise NotImplementedError

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """G = J Jᵀ of the global batch."""
        raise NotImplementedError

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        """Give the trunk the combined update d (N,)."""
        raise NotImplementedError

    @staticmethod
    def apply_task_grads(jac: Jacobian, scale: Optional[torch.Tensor]) -> None:
        """Task-specific parameters receive Σ_t s_t ∂objective_t/∂θ_task (s = 1 when `scale` is None)."""
        for t, grads in enumerate(jac.task_grads):
            s = float(scale[t]) if scale is not None else 1.0
            _accumulate(jac.task_params, [g * s if g is not None else None for g in grads])


class FeatureSpace(GradientSpace):
    name = "feature"
    needs_shared_features = True
    shared_grads_reduced = False

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        shared = list(ctx.shared)
        matrix, task_params, task_grads = per_task_grads(
            objectives, shared, ctx, retain_last=True,
            flatten=lambda grads: torch.cat([g.reshape(len(g), -1) for g in grads], 1).reshape(-1))
        return Jacobian(matrix.float(), task_params, task_grads)

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gramian = ctx.all_reduce(matrix @ matrix.T)
        if ctx.world_size > 1:
            gramian = gramian / ctx.world_size ** 2
        return gramian

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        shared = ctx.shared
        parts = update.view(len(shared[0]), -1).split([s[0].numel() for s in shared], 1)
        pairs = [(t, u.reshape(t.shape).to(t.dtype)) for u, t in zip(parts, ctx.trunk) if t.requires_grad]
        if pairs:  # nothing to reach when the whole trunk is frozen (finetune.freeze_backbone_epochs)
            torch.autograd.backward([t for t, _ in pairs], [u for _, u in pairs])


class ParameterSpace(GradientSpace):
    name = "parameter"
    needs_shared_features = False
    shared_grads_reduced = True

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        shared_params = [p for p in ctx.shared_params if p.requires_grad]
        matrix, task_params, task_grads = per_task_grads(
            objectives, shared_params, ctx, retain_last=False,
            flatten=lambda grads: torch.cat([g.reshape(-1) for g in grads]) if grads else objectives[0].new_zeros(0))
        return Jacobian(ctx.mean_over_ranks(matrix), task_params, task_grads)

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return matrix @ matrix.T  # J is the rank average already

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        offset = 0
        for p in (p for p in ctx.shared_params if p.requires_grad):
            n = p.numel()
            p.grad = update[offset:offset + n].view_as(p).to(p.dtype)
            offset += n


SPACES: dict[str, GradientSpace] = {"feature": FeatureSpace(), "parameter": ParameterSpace()}
