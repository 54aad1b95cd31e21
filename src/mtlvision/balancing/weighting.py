"""Loss-weighting methods with constant weights: one backward of sum_t w_t L_t."""
from __future__ import annotations

import dataclasses

import torch

from ..errors import ConfigError
from ..tasks import Task
from .base import METHODS, Balancer, StepContext


class _ConstantWeights(Balancer):
    def __init__(self, tasks: list[Task], weights: dict[str, float]) -> None:
        super().__init__(tasks)
        self.weights = weights

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        total = sum(self.weights[k] * v for k, v in losses.items())
        total.backward()
        return dict(self.weights)


@METHODS.register("equal", description="Equal weighting (EW): backward of the plain sum of task losses.")
class Equal(_ConstantWeights):
    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(tasks, {t.name: 1.0 for t in tasks})


@dataclasses.dataclass
class FixedParams:
    weights: dict[str, float] = dataclasses.field(default_factory=dict)  # unlisted tasks: 1.0


@METHODS.register("fixed", params=FixedParams,
                  description="Fixed weights: backward of sum_t w_t L_t with weights from the config.")
class Fixed(_ConstantWeights):
    def __init__(self, p: FixedParams, tasks: list[Task]) -> None:
        names = [t.name for t in tasks]
        unknown = sorted(set(p.weights) - set(names))
        if unknown:
            raise ConfigError(f"balancing.weights: unknown task(s) {unknown}; tasks are {names}")
        super().__init__(tasks, {n: float(p.weights.get(n, 1.0)) for n in names})
