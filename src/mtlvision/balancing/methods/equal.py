"""Equal weighting (EW): the plain sum of the task losses."""
from __future__ import annotations

import torch

from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective


@METHODS.register("equal", description="Equal weighting (EW): backward of the plain sum of task losses.")
class Equal(LossWeighting):
    """Equal weighting: one backward of Σ_t L_t (every weight 1)."""

    promises = Promises(scaling="weights")

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        total = sum(1.0 * v for v in losses.values())
        return Objective(total, torch.ones(len(self.task_names), dtype=torch.float64))
