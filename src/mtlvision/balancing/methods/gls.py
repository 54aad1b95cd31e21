"""Geometric Loss Strategy (Chennupati et al., CVPR-W 2019)."""
from __future__ import annotations

import torch

from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses


@METHODS.register("gls", description="Geometric loss strategy: minimise the geometric mean (prod_t L_t)^(1/T) "
                                     "(Chennupati et al., CVPR-W 2019).")
class GeometricLossStrategy(LossWeighting):
    r"""Geometric Loss Strategy (GLS).

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019 (WAD).
    One backward pass of the geometric mean of the task losses,

        L = (prod_t L_t)^(1/T) = exp((1/T) sum_t log L_t),

    computed in log space (no under/overflow of the product). The implied weight of task t, reported
    for telemetry, is dL/dL_t = L / (T L_t): tasks with smaller losses get larger weights, which is
    the method's intended focus on the harder-to-improve, already-small losses.

    Guard (log 0): a task whose loss is exactly 0 in the batch is left out of the product -- the step
    minimises the geometric mean of the present tasks (T counts only those), and the absent task's
    reported weight is 0. Without this, one zero factor makes the product 0 and its gradient with
    respect to every other task 0 (and its own infinite). Losses below the smallest normal float are
    clamped inside the log so 1/L_t stays finite. If no task is present the step back-propagates a
    zero (every gradient 0).
    """

    promises = Promises(scaling="direction")

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        loss = stack_losses(losses, self.task_names)
        present = loss.detach() != 0
        n = present.sum().clamp(min=1).to(loss.dtype)
        tiny = torch.finfo(loss.dtype).tiny
        logs = torch.where(present, torch.log(loss.clamp(min=tiny)), torch.zeros_like(loss))
        total = torch.exp(logs.sum() / n)
        total = torch.where(present.any(), total, loss.sum() * 0.0)
        g = total.detach()
        w = torch.where(present, g / (n * loss.detach().clamp(min=tiny)), torch.zeros_like(loss))
        return Objective(total, w)
