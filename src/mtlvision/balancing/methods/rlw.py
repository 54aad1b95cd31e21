"""Random Loss Weighting (Lin, Ye, Zhang & Tsang, TMLR 2022)."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses
from ..seeding import Seeded


@dataclasses.dataclass
class RLWParams:
    # Seed of the weight draws; null: the torch seed in force when the method is built (the trainer
    # seeds torch with the run's `seed` just before, so each run seed gets its own weight sequence).
    seed: Optional[int] = None


@METHODS.register("rlw", params=RLWParams,
                  description="Random loss weighting: w = softmax(x), x ~ N(0, I) drawn afresh each step "
                              "(Lin et al., TMLR 2022).")
class RandomLossWeighting(Seeded, LossWeighting):
    r"""Random Loss Weighting (RLW).

    Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022 (arXiv:2111.10603). Each step draws x ~ N(0, I_T) (the paper's
    default distribution), sets w = softmax(x) (so w_t > 0 and sum_t w_t = 1) and back-propagates
    sum_t w_t L_t.

    Reproducibility: the draw does not touch the global torch RNG. Step (epoch, step) draws from
    `rng.keyed_generator(seed, epoch, step)` (seeding.py), like every keyed draw in mtlvision, so the
    weights are a pure function of (seed, epoch, step): a run, its rerun and a run resumed from any
    checkpoint draw the same weights at the same step, and data-parallel ranks agree without
    communicating. `seed` (null by default: the torch seed at build time, which the trainer sets to
    the run's seed) is saved in `extra_state` and restored on resume. (Until the keyed-RNG
    unification RLW seeded its generator from numpy.random.SeedSequence([seed, epoch, step]); the
    draws changed then, once.)

    A zero loss needs no guard: the weights do not depend on the losses.
    """

    promises = Promises(permutation="positional", scaling="weights")

    def __init__(self, p: RLWParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.init_seed(p.seed)

    def weights(self, epoch: int, step: int) -> torch.Tensor:
        """The (T,) weights of step `step` in epoch `epoch`."""
        x = torch.randn(len(self.task_names), generator=self.generator(epoch, step), dtype=torch.float64)
        return torch.softmax(x, dim=0)

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        w = self.weights(ctx.epoch, ctx.step)
        loss = stack_losses(losses, self.task_names)
        return Objective((w.to(device=loss.device, dtype=loss.dtype) * loss).sum(), w)
