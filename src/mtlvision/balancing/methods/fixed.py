"""Fixed task weights from the config."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective


@dataclasses.dataclass
class FixedParams:
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # unlisted tasks: 1.0


@METHODS.register("fixed", params=FixedParams,
                  description="Fixed weights: backward of sum_t w_t L_t with weights from the config.")
class Fixed(LossWeighting):
    """Fixed weights: one backward of Σ_t w_t L_t, w from `weights` (1 for unlisted tasks)."""

    promises = Promises(scaling="weights")

    def __init__(self, p: FixedParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        names = [t.name for t in tasks]
        unknown = sorted(set(p.weights) - set(names))
        if unknown:
            raise ConfigError(f"balancing.weights: unknown task(s) {unknown}; tasks are {names}")
        self.weights = {n: float(p.weights.get(n, 1.0)) for n in names}

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        total = sum(self.weights[k] * v for k, v in losses.items())
        return Objective(total, torch.tensor([self.weights[n] for n in self.task_names], dtype=torch.float64))
