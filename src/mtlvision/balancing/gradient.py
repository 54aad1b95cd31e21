"""Gradient balancing: per-task gradients -> Gramian G = J Jᵀ -> weights w -> one update d = Jᵀw.

Two spaces, chosen per method with `space`:

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

Task-specific parameters (heads, and modules that only task heads read) always receive the plain sum
of their own tasks' gradients.

Data parallel (N ranks, each loss a mean over the rank's rows): in feature space each rank holds its
own rows of the global J, scaled by 1/N, so the global G = Σ_r J_r J_rᵀ / N² is one all_reduce of
the T x T Gramian (`StepContext.all_reduce`); each rank then back-propagates its local combined
gradient and the trainer averages the trunk gradients. In parameter space the global J is the mean of
the ranks' J: it is averaged before G is formed, so the trunk update is already the global one.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch

from ..tasks import Task
from .base import Balancer, StepContext


@dataclasses.dataclass
class GradientParams:
    space: Literal["feature", "parameter"] = "feature"


def _accumulate(params: list[torch.nn.Parameter], grads: list[Optional[torch.Tensor]]) -> None:
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g


class GradientBalancer(Balancer):
    """Base of Gramian-based methods: subclasses implement `weights(G, ctx) -> w`.

    `weight_task_grads`: task-specific parameters receive sum_t w_t grad L_t (methods that define a
    weighted total loss, e.g. GradNorm) instead of the plain sum.
    """

    weight_task_grads = False

    def __init__(self, p: GradientParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.space = p.space
        self.gramian: Optional[torch.Tensor] = None  # last step's G, for telemetry

    @property
    def needs_shared_features(self) -> bool:
        """True when the method differentiates the losses with respect to the shared tensors."""
        return self.space == "feature"

    @property
    def shared_grads_reduced(self) -> bool:  # type: ignore[override]
        """Parameter space: the trunk update comes from the rank-averaged J, so it is global already."""
        return self.space == "parameter"

    def weights(self, gramian: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError

    def _record_gramian(self, jacobian: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """G = J Jᵀ of the global batch (feature space: Σ_r G_r / N², see the module docstring); kept
        for telemetry."""
        gramian = jacobian @ jacobian.T
        if self.space == "feature":
            gramian = ctx.all_reduce(gramian)
            if ctx.world_size > 1:
                gramian = gramian / ctx.world_size ** 2
        self.gramian = gramian.detach()
        return gramian

    def _combine(self, jacobian: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        gramian = self._record_gramian(jacobian, ctx)
        w = self.weights(gramian, ctx).to(jacobian.dtype)
        return w @ jacobian, w

    def transform(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The per-task objectives whose gradients are balanced (the losses themselves by default)."""
        return losses

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        names = self.task_names
        losses = self.transform(losses)
        task_params = [p for p in ctx.task_params if p.requires_grad]
        task_grads = []
        if self.space == "feature":
            shared, k = list(ctx.shared), len(ctx.shared)
            rows = []
            for t, name in enumerate(names):
                grads = torch.autograd.grad(losses[name], [*shared, *task_params], retain_graph=True,
                                            allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(s)).reshape(len(s), -1)
                                       for s, g in zip(shared, grads[:k])], 1).reshape(-1))
                task_grads.append(list(grads[k:]))
            update, w = self._combine(torch.stack(rows).float(), ctx)
            update = update.view(len(shared[0]), -1).split([s[0].numel() for s in shared], 1)
            torch.autograd.backward(list(ctx.trunk), [u.reshape(s.shape).to(s.dtype)
                                                      for u, s in zip(update, ctx.trunk)])
        else:
            shared_params = [p for p in ctx.shared_params if p.requires_grad]
            rows = []
            for t, name in enumerate(names):
                grads = torch.autograd.grad(losses[name], [*shared_params, *task_params],
                                            retain_graph=t < len(names) - 1, allow_unused=True)
                rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                       for p, g in zip(shared_params, grads[:len(shared_params)])]))
                task_grads.append(list(grads[len(shared_params):]))
            update, w = self._combine(ctx.mean_over_ranks(torch.stack(rows)), ctx)
            offset = 0
            for p in shared_params:
                n = p.numel()
                p.grad = update[offset:offset + n].view_as(p).to(p.dtype)
                offset += n
        for t, grads in enumerate(task_grads):
            scale = float(w[t]) if self.weight_task_grads else 1.0
            _accumulate(task_params, [g * scale if g is not None else None for g in grads])
        return dict(zip(names, w.tolist()))
