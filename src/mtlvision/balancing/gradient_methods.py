"""Gradient-balancing methods: each one a function of the task Gramian (see `gramian.py`), applied
through `GradientBalancer` in feature space (default) or parameter space."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..tasks import Task
from . import gramian
from .base import METHODS, StepContext
from .gradient import GradientBalancer, GradientParams


def _step_generator(seed: int, ctx: StepContext) -> torch.Generator:
    """Random task orders from (seed, epoch, step): reproducible, resumable, equal on every rank."""
    return torch.Generator().manual_seed(hash((seed, ctx.epoch, ctx.step)) & 0x7FFF_FFFF_FFFF_FFFF)


class _Stateless(GradientBalancer):
    """A method whose weights depend on G alone: `solver(G) -> w`."""

    solver: Callable[[torch.Tensor], torch.Tensor]

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return type(self).solver(G)


@METHODS.register("mgda", params=GradientParams,
                  description="MGDA: min-norm point of the task gradients' convex hull, Frank-Wolfe "
                              "(Sener & Koltun, NeurIPS 2018); feature space = MGDA-UB.")
class MGDA(_Stateless):
    solver = gramian.mgda


@dataclasses.dataclass
class SeededParams(GradientParams):
    seed: Optional[int] = None  # default: the run's seed


class _Seeded(GradientBalancer):
    def __init__(self, p: SeededParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.seed = int(p.seed if p.seed is not None else torch.initial_seed())


@METHODS.register("pcgrad", params=SeededParams,
                  description="PCGrad: project away conflicting components in random task order "
                              "(Yu et al., NeurIPS 2020).")
class PCGrad(_Seeded):
    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return gramian.pcgrad(G, _step_generator(self.seed, ctx))


@dataclasses.dataclass
class CAGradParams(GradientParams):
    c: float = 0.4
    rescale: bool = False  # divide by 1 + c^2 as the official code does


@METHODS.register("cagrad", params=CAGradParams,
                  description="CAGrad: best worst-case improvement within a ball around the mean gradient "
                              "(Liu et al., NeurIPS 2021).")
class CAGrad(GradientBalancer):
    def __init__(self, p: CAGradParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.c, self.rescale = p.c, p.rescale

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return gramian.cagrad(G, self.c, rescale=self.rescale)


@dataclasses.dataclass
class GradVacParams(SeededParams):
    beta: float = 0.01  # EMA rate of the target similarities (paper's default)


@METHODS.register("gradvac", params=GradVacParams,
                  description="GradVac: raise pairwise gradient similarity to EMA targets "
                              "(Wang et al., ICLR 2021).")
class GradVac(_Seeded):
    def __init__(self, p: GradVacParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.beta = p.beta
        self.register_buffer("ema", torch.zeros(len(tasks), len(tasks), dtype=torch.float64))

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        w, ema = gramian.gradvac(G, self.ema, self.beta, _step_generator(self.seed, ctx))
        self.ema.copy_(ema)
        return w


@METHODS.register("imtl_g", params=GradientParams,
                  description="IMTL-G: update with equal projections on every task's unit gradient "
                              "(Liu et al., ICLR 2021).")
class IMTLG(_Stateless):
    solver = gramian.imtl_g


@METHODS.register("nash_mtl", params=GradientParams,
                  description="Nash-MTL: bargaining solution (G w)_i = 1/w_i, solved exactly by Newton "
                              "(Navon et al., ICML 2022).")
class NashMTL(_Stateless):
    solver = gramian.nash_mtl


@METHODS.register("aligned_mtl", params=GradientParams,
                  description="Aligned-MTL: align the gradient system to condition number 1 "
                              "(Senushkin et al., CVPR 2023).")
class AlignedMTL(_Stateless):
    solver = gramian.aligned_mtl


@METHODS.register("upgrad", params=GradientParams,
                  description="UPGrad: mean of the projections onto the dual cone "
                              "(Quinton & Rey, 2024: Jacobian descent).")
class UPGrad(_Stateless):
    solver = gramian.upgrad
