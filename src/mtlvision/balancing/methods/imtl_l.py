"""IMTL-L, the loss-balance half of Impartial Multi-Task Learning (Liu et al., ICLR 2021)."""
from __future__ import annotations

import torch
from torch import nn

from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses


@METHODS.register("imtl_l", description="IMTL-L: learned scales s_t, sum_t exp(s_t) L_t - s_t, so exp(s_t) L_t -> 1 "
                                        "(Liu et al., ICLR 2021).")
class IMTLL(LossWeighting):
    r"""IMTL-L, the loss-balance half of Impartial Multi-Task Learning.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021. Each task has a learnable scale parameter s_t (nn.Parameter, init 0, in the main
    optimiser without weight decay) and one backward pass is taken of

        L = sum_t exp(s_t) L_t - s_t.

    The network receives sum_t exp(s_t) grad L_t; dL/ds_t = exp(s_t) L_t - 1, so at the optimum in s
    every scaled loss exp(s_t) L_t equals 1 (the paper's "impartial" loss scales). Reported weights:
    exp(s_t). This is IMTL-L alone (the paper's loss-balance ablation), without IMTL-G's gradient
    step. (It coincides with `uw` in its default form under s_t -> -s_t.)

    Absent tasks (L_t == 0): the term is left out for that step, so s_t gets a zero gradient instead
    of the regulariser's constant push towards +inf.
    """

    promises = Promises(scaling="weights")

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.zeros(len(tasks)))

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        loss = stack_losses(losses, self.task_names)
        present = (loss.detach() != 0).to(loss.dtype)
        s = self.log_scales.to(loss.dtype)
        total = (present * (torch.exp(s) * loss - s)).sum()
        return Objective(total, torch.exp(self.log_scales.detach()))
