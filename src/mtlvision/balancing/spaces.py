"""Where per-task gradients are taken: feature space and parameter space, one interface.

A `GradientSpace` computes the per-task Jacobian J (T x N) of a step's objectives, the Gramian G = J Jᵀ of
the global batch, and applies a combined update d (N,) to the trunk. Gradient methods see only J, G and d,
never which space they run in.

* `feature` (default; "MGDA-UB", Sener & Koltun 2018): J holds each task's gradient with respect to
  the shared representation (B x D; where an architecture's tasks read several trunk tensors, e.g.
  MTAN's stage outputs, their per-example concatenation). The T rows cost one autograd call per task
  with respect to the shared tensors only, each traversing its own task's modules: where those are
  private to the task (heads; MTAN's attention, MoE gates, cross-stitch heads) the T calls together
  cost one backward through them; a module every task reads is crossed once per task, unless the
  architecture offers the rows in closed form (task-features, see the module note). Then ONE backward
  through the trunk with the combined gradient. (A vmap-batched pass over the tasks was measured on the
  CPU and was slower: see the module note at the end.)
  It balances what the trunk receives through the representation, an upper-bound surrogate of the
  exact parameter-space problem. In multi-input runs every task owns different rows of the
  representation, so cross-task inner products are zero there; use `parameter` to see conflicts.
* `parameter`: J holds each task's gradient with respect to every shared (trunk) parameter: exact,
  at the price of T backward passes through the trunk.

Task-specific parameters (heads, and modules that only task heads read) receive the sum of their own
tasks' gradients (scaled per task where a method asks for it, see `Combination.task_scale`), from one
backward of the objectives restricted to them once the method has combined (`apply_task_grads`).

Data parallel (N ranks, each loss a mean over the rank's rows): in feature space each rank holds its
own rows of the global J, scaled by 1/N, so the global G = Σ_r J_r J_rᵀ / N² is one all_reduce of
the T x T Gramian (`StepContext.all_reduce`); each rank then back-propagates its local combined
gradient and the trainer averages the trunk gradients. In parameter space the global J is the mean of
the ranks' J: it is averaged before G is formed, so the trunk update is already the global one
(`shared_grads_reduced`).

Note on many tasks. The per-task calls differentiate the shared tensors only; the task-specific
parameters are differentiated once, by `apply_task_grads` (before, every call also took its task's
gradients of the parameters of modules all tasks read: T times task-features' attention weights; at
T = 40 on the CPU that cut the attention's cost by 40%). Measured on the CPU and not kept: one
`torch.autograd.grad(..., is_grads_batched=True)` over one-hot output gradients (about twice as slow
as the loop: the per-task cotangents of a module all tasks read become dense (T, B, T, d) tensors and
the pass is memory-bound; private heads are back-propagated T times each), and one hooked backward
through the task-private modules followed by a batched pass through the shared-by-all ones (no faster
than the loop, plus Python work per graph node: O(T²) nodes in cross-stitch's final mixing).
An architecture can do better with its own structure: task-features offers its rows in closed form
(`ModelOutput.task_jacobian`, carried by `StepContext.task_jacobian`): one backward of the summed objectives
to the heads' inputs, then a few batched products through the sharing module instead of T passes through it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch
from torch import nn

from .context import StepContext


@dataclasses.dataclass
class Jacobian:
    """Per-task gradients of one step: the rows of J, and what the task-specific parameters' gradients are
    taken from once the method has said how to scale them (`GradientSpace.apply_task_grads`)."""

    matrix: torch.Tensor  # (T, N); parameter space: averaged over ranks
    task_params: list[nn.Parameter]  # the task-specific parameters that require grad
    objectives: list[torch.Tensor]  # the step's objectives, their graph kept for `apply_task_grads`


def task_parameters(ctx: StepContext) -> list[nn.Parameter]:
    return [p for p in ctx.task_params if p.requires_grad]


def per_task_rows(objectives: list[torch.Tensor], wrt: list[torch.Tensor],
                  flatten: Callable[[list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """J: row t is `flatten` of objective t's gradients with respect to `wrt` (zeros where unused; a zero row
    for an objective that does not require grad). One autograd call per objective, with respect to `wrt`
    only: the task-specific parameters are differentiated once, afterwards (`apply_task_grads`). The graph
    is kept."""
    if not wrt:  # nothing trainable upstream (a frozen backbone, finetune.freeze_backbone_epochs): empty rows
        return torch.zeros(len(objectives), 0, device=objectives[0].device)
    rows = []
    for objective in objectives:
        grads = (torch.autograd.grad(objective, wrt, allow_unused=True, retain_graph=True)
                 if objective.requires_grad else [None] * len(wrt))
        rows.append(flatten([g if g is not None else torch.zeros_like(x) for x, g in zip(wrt, grads)]))
    return torch.stack(rows)


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
        """Task-specific parameters receive Σ_t s_t ∂objective_t/∂θ_task (s = 1 when `scale` is None): one
        backward of the objectives with output gradients s_t, restricted to those parameters. It frees the
        step's graph."""
        used = [t for t, o in enumerate(jac.objectives) if o.requires_grad]
        if not jac.task_params or not used:
            return
        objectives = [jac.objectives[t] for t in used]
        seeds = [torch.ones_like(o) if scale is None else torch.full_like(o, float(scale[t]))
                 for t, o in zip(used, objectives)]
        torch.autograd.backward(objectives, seeds, inputs=jac.task_params)


class FeatureSpace(GradientSpace):
    name = "feature"
    needs_shared_features = True
    shared_grads_reduced = False

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        """Row t: objective t's gradient at the shared tensors, each flattened per example and concatenated.
        Taken by the model's closed form where it offers one (`StepContext.task_jacobian`: task-features),
        else by one autograd call per task (`per_task_rows`). Not a fallback: both give the same J, the first
        without crossing a module that every task reads once per task (the module note "Note on many tasks")."""
        if ctx.task_jacobian is not None:
            matrix = ctx.task_jacobian(objectives)
        else:
            matrix = per_task_rows(objectives, list(ctx.shared),
                                   lambda grads: torch.cat([g.reshape(len(g), -1) for g in grads], 1).reshape(-1))
        return Jacobian(matrix.float(), task_parameters(ctx), objectives)

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
        matrix = per_task_rows(objectives, shared_params, lambda grads: torch.cat([g.reshape(-1) for g in grads]))
        return Jacobian(ctx.mean_over_ranks(matrix), task_parameters(ctx), objectives)

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return matrix @ matrix.T  # J is the rank average already

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        offset = 0
        for p in (p for p in ctx.shared_params if p.requires_grad):
            n = p.numel()
            p.grad = update[offset:offset + n].view_as(p).to(p.dtype)
            offset += n


SPACES: dict[str, GradientSpace] = {"feature": FeatureSpace(), "parameter": ParameterSpace()}
