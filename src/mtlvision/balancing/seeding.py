"""Randomised methods (RLW, PCGrad, GradVac, GradDrop): draws keyed by (seed, epoch, step).

A step's draws come from `rng.keyed_generator(seed, epoch, step)`, never from the global RNG, so they are
a pure function of the step: a run, its rerun and a run resumed from any checkpoint draw the same numbers,
and data-parallel ranks agree without communicating. `seed` (null by default: the torch seed in force when
the method is built, which the trainer sets to the run's seed just before) is saved in `extra_state`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..rng import keyed_generator


class Seeded:
    """Mixin for a Balancer whose draws are keyed by (seed, epoch, step)."""

    seed: int

    def init_seed(self, seed: Optional[int]) -> None:
        self.seed = int(seed if seed is not None else torch.initial_seed())

    def generator(self, epoch: int, step: int) -> torch.Generator:
        """The generator of step `step` in epoch `epoch`."""
        return keyed_generator(self.seed, epoch, step)

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "seed" in state:
            self.seed = int(state["seed"])
