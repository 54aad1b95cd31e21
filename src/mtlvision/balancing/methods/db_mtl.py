"""DB-MTL, Dual-Balancing Multi-Task Learning (Lin et al., 2023): a loss transform and a Jacobian aggregator."""
from __future__ import annotations

import dataclasses

import torch

from ...tasks import Task
from ..base import GRADIENT_PARAMETER, METHODS, Promises
from ..context import StepContext
from ..gradient import Combination, GradientMethod, GradientParams, TaskGradients


@dataclasses.dataclass
class DBMTLParams:
    beta: float = 0.9  # EMA factor of the gradients
    beta_sigma: float = 0.0  # decay: beta_k = beta / k^beta_sigma
    eps: float = 1e-8  # inside log(L_t + eps)


@METHODS.register("db_mtl", params=DBMTLParams,
                  description="DB-MTL: log-transformed losses + EMA gradients scaled to the largest norm "
                              "(Lin et al., 2023); parameter space.")
class DBMTL(GradientMethod):
    r"""Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi & Zhang, 2023).

    Loss-scale balancing: each task contributes log(L_t + eps) (the loss transform). Gradient-magnitude
    balancing: an exponential moving average ĝ_t ← β_k ĝ_t + (1 − β_k) ∇ log(L_t + eps), β_k = β / k^σ,
    and the update

        d = Σ_t (max_j ||ĝ_j|| / ||ĝ_t||) ĝ_t

    gives every task the largest gradient magnitude. The average is over steps of the same parameter
    vector, so this method works in parameter space (T backward passes through the trunk); task
    heads receive the plain sum of ∇ log(L_t + eps). State: the step count `steps` and the average
    `average` (T x trunk parameters, sized on the first step).
    """

    cost_class = GRADIENT_PARAMETER
    spaces = ("parameter",)
    promises = Promises(weighted_sum=False, scaling="update")

    def __init__(self, p: DBMTLParams, tasks: list[Task]) -> None:
        super().__init__(GradientParams(space="parameter"), tasks)
        self.beta, self.beta_sigma, self.eps = p.beta, p.beta_sigma, p.eps
        self.declare_state(steps=torch.zeros((), dtype=torch.long), average=torch.zeros(0))

    def transform(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: torch.log(v + self.eps) for n, v in losses.items()}

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        jacobian = grads.matrix
        steps = self.steps + 1
        beta = self.beta / float(steps) ** self.beta_sigma
        previous = self.average if self.average.shape == jacobian.shape else torch.zeros_like(jacobian)
        average = (previous * beta).add_(jacobian.detach(), alpha=1 - beta)
        norms = average.norm(dim=1)
        w = norms.max() / norms.clamp(min=1e-30)
        return Combination(w @ average, w, state={"steps": steps, "average": average})
