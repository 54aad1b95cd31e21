"""Uncertainty Weighting (Kendall, Gal & Cipolla, CVPR 2018)."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses


@dataclasses.dataclass
class UncertaintyParams:
    # "log_sigma": L = sum_t exp(-s_t) L_t + s_t / 2 (Kendall et al. eq. 10, classification; optimum 1/(2 L_t))
    # "log_var":   L = sum_t exp(-s_t) L_t + s_t     (log sigma^2 regulariser; optimum 1/L_t; equals IMTL-L)
    regulariser: Literal["log_sigma", "log_var"] = "log_sigma"


@METHODS.register("uw", params=UncertaintyParams,
                  description="Uncertainty weighting: learned log-variances s_t, sum_t exp(-s_t) L_t + s_t/2 "
                              "(Kendall, Gal & Cipolla, CVPR 2018).")
class UncertaintyWeighting(LossWeighting):
    r"""Uncertainty Weighting (UW).

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

    Each task has a learnable log-variance s_t = log sigma_t^2 (an nn.Parameter, initialised to 0,
    i.e. sigma^2 = 1 and weight 1; it joins the main optimiser with no weight decay), and one
    backward pass is taken of the paper's classification objective (eq. 10, softmax scaled by 1/sigma^2)

        L = sum_t 1/sigma_t^2 L_t + log sigma_t = sum_t exp(-s_t) * L_t + s_t / 2     (default)

    so the network receives sum_t exp(-s_t) grad L_t, dL/ds_t = 1/2 - exp(-s_t) L_t, and at the
    optimum in s_t the weight is exp(-s_t) = 1/(2 L_t). Reported weights: exp(-s_t).

    `regulariser: log_var` uses log sigma^2 = s as the regulariser instead (the form of the authors'
    released example code, precision * loss + log_var): the same relative task weights at twice the
    overall scale (1/L_t). That variant equals IMTL-L's sum_t exp(s'_t) L_t - s'_t under s'_t = -s_t,
    which is why the paper's eq. 10 is the default here.

    Absent tasks (L_t == 0): the term exp(-s_t) L_t + s_t is left out for that step, so s_t gets a
    zero gradient instead of being pushed to -inf by the regulariser alone.
    """

    promises = Promises(scaling="weights")

    def __init__(self, p: UncertaintyParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.reg_scale = 1.0 if p.regulariser == "log_var" else 0.5  # coefficient of s_t
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        loss = stack_losses(losses, self.task_names)
        present = (loss.detach() != 0).to(loss.dtype)
        s = self.log_vars.to(loss.dtype)
        total = (present * (torch.exp(-s) * loss + self.reg_scale * s)).sum()
        return Objective(total, torch.exp(-self.log_vars.detach()))
