"""Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective


@dataclasses.dataclass
class DWAParams:
    temperature: float = 2.0  # tau in w_t = T softmax(r_t / tau); the paper uses 2


@METHODS.register("dwa", params=DWAParams,
                  description="Dynamic Weight Average: w = T softmax(r/tau), r_t = epoch-loss ratio L_t(e-1)/L_t(e-2) "
                              "(Liu, Johns & Davison, CVPR 2019).")
class DynamicWeightAverage(LossWeighting):
    r"""Dynamic Weight Average (DWA).

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv:1803.10704):

        w_t(e) = T * exp(r_t(e-1) / tau) / sum_i exp(r_i(e-1) / tau),   r_t(e-1) = L_t(e-1) / L_t(e-2)

    where L_t(e) is task t's mean training loss over epoch e (given by the trainer's `epoch_end`),
    T the number of tasks and tau the temperature (2 in the paper). w = 1 for the first two epochs
    (e = 0, 1; the paper's "r_k(t) = 1 for t = 1, 2"). The weights are fixed for a whole epoch and
    each step back-propagates sum_t w_t L_t.

    The epoch-mean losses of the last two epochs are kept by epoch number in `extra_state`, so a
    resumed run uses exactly the weights the uninterrupted one would. The weights of epoch e use the
    means of epochs e-1 and e-2 only; if either is unknown the weights are all 1.

    Guards: a ratio whose denominator is 0 (a task never labelled in epoch e-2) or that is not finite
    is replaced by 1, the neutral "no change" ratio. A batch with a zero loss needs no guard (the
    weights do not depend on the batch).
    """

    promises = Promises(scaling="weights")

    def __init__(self, p: DWAParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if not p.temperature > 0:
            raise ConfigError(f"balancing.temperature: must be > 0, got {p.temperature}")
        self.temperature = p.temperature
        self.history: dict[int, dict[str, float]] = {}  # epoch -> mean training loss per task
        self._cache: tuple[int, dict[str, float]] = (-1, {})

    def weights(self, epoch: int) -> dict[str, float]:
        """The task weights used throughout epoch `epoch` (0-based)."""
        if self._cache[0] == epoch:
            return self._cache[1]
        names = self.task_names
        prev, prev2 = self.history.get(epoch - 1), self.history.get(epoch - 2)
        if epoch < 2 or prev is None or prev2 is None:
            w = {n: 1.0 for n in names}
        else:
            ratios = []
            for n in names:
                num, den = float(prev[n]), float(prev2[n])
                r = num / den if den > 0 else 1.0
                ratios.append(r if math.isfinite(r) else 1.0)
            z = np.asarray(ratios, dtype=np.float64) / self.temperature
            e = np.exp(z - z.max())
            w = dict(zip(names, (len(names) * e / e.sum()).tolist()))
        self._cache = (epoch, w)
        return w

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        w = self.weights(ctx.epoch)
        total = sum(w[n] * losses[n] for n in self.task_names)
        return Objective(total, torch.tensor([w[n] for n in self.task_names], dtype=torch.float64))

    def epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        self.history[epoch] = {n: float(mean_losses[n]) for n in self.task_names}
        for old in [e for e in self.history if e < epoch - 1]:
            del self.history[old]
        self._cache = (-1, {})

    def extra_state(self) -> dict[str, Any]:
        return {"history": [{"epoch": e, "losses": dict(v)} for e, v in sorted(self.history.items())]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = {int(h["epoch"]): {n: float(h["losses"][n]) for n in self.task_names}
                        for h in state.get("history", [])}
        self._cache = (-1, {})
