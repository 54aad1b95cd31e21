"""GradDrop (Chen et al., NeurIPS 2020): a Jacobian aggregator in feature space."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...tasks import Task
from ..base import GRADIENT_FEATURE, METHODS, Promises
from ..context import StepContext
from ..gradient import Combination, GradientMethod, GradientParams, TaskGradients
from ..seeding import Seeded


@dataclasses.dataclass
class GradDropParams:
    leak: float = 0.0  # l_i: share of each task's gradient that always passes (0 = "pure" GradDrop)
    seed: Optional[int] = None  # default: the run's seed


@METHODS.register("graddrop", params=GradDropParams,
                  description="GradDrop: keep one gradient sign per unit, drawn by sign purity "
                              "(Chen et al., NeurIPS 2020); feature space only.")
class GradDrop(Seeded, GradientMethod):
    r"""Gradient Sign Dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout", NeurIPS 2020, Algorithm 1, lines 10-15), applied at the shared
    representation A (B x D), where it acts as a layer. Not a function of G. With per-task gradients
    ∇_i = ∂L_i/∂A and their batch-reduced signals S_i = Σ_batch sign(A) ∘ ∇_i (the paper's
    "batch-reduced" variant with the activation sign):

        P = ½ (1 + Σ_i S_i / Σ_i |S_i|)                     positive sign purity, per unit (D)
        U ~ Uniform(0, 1)                                     per unit, per step
        M_i = [P > U] ∘ [S_i > 0] + [P < U] ∘ [S_i < 0]
        ∂L/∂A = Σ_i (l_i + (1 - l_i) M_i) ∘ ∇_i

    The reported "weight" of task i is the fraction of units where its gradient passes. U comes from
    the step's keyed generator; the signals are summed over data-parallel ranks.
    """

    cost_class = GRADIENT_FEATURE
    spaces = ("feature",)
    promises = Promises(weighted_sum=False)

    def __init__(self, p: GradDropParams, tasks: list[Task]) -> None:
        super().__init__(GradientParams(space="feature"), tasks)
        self.init_seed(p.seed)
        self.leak = p.leak

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        jacobian = grads.matrix
        activation = ctx.shared_matrix()  # (B, D)
        per_unit = jacobian.view(len(jacobian), len(activation), -1)  # (T, B, D)
        signal = ctx.all_reduce((per_unit * activation.sign()[None]).sum(1))  # (T, D)
        purity = 0.5 * (1 + signal.sum(0) / signal.abs().sum(0).clamp(min=1e-30))
        u = torch.rand(purity.shape, generator=self.generator(ctx.epoch, ctx.step)).to(purity.device)
        mask = ((purity > u) & (signal > 0)) | ((purity < u) & (signal < 0))  # (T, D)
        keep = self.leak + (1 - self.leak) * mask.to(per_unit.dtype)
        update = (keep[:, None, :] * per_unit).sum(0).reshape(-1)
        return Combination(update, mask.to(per_unit.dtype).mean(1))
