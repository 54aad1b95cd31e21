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


@dataclasses.dataclass
class GradDropParams:
    leak: float = 0.0  # l_i: share of each task's gradient that always passes (0 = "pure" GradDrop)
    seed: Optional[int] = None  # default: the run's seed


@METHODS.register("graddrop", params=GradDropParams,
                  description="GradDrop: keep one gradient sign per unit, drawn by sign purity "
                              "(Chen et al., NeurIPS 2020); feature space only.")
class GradDrop(_Seeded):
    r"""Gradient Sign Dropout (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with
    Gradient Sign Dropout", NeurIPS 2020, Algorithm 1, lines 10-15), applied at the shared
    representation A (B x D), where it acts as a layer. Not a function of G. With per-task gradients
    ∇_i = ∂L_i/∂A and their batch-reduced signals S_i = Σ_batch sign(A) ∘ ∇_i (the paper's
    "batch-reduced" variant with the activation sign):

        P = ½ (1 + Σ_i S_i / Σ_i |S_i|)                     positive sign purity, per unit (D)
        U ~ Uniform(0, 1)                                     per unit, per step
        M_i = [P > U] ∘ [S_i > 0] + [P < U] ∘ [S_i < 0]
        ∂L/∂A = Σ_i (l_i + (1 - l_i) M_i) ∘ ∇_i

    The reported "weight" of task i is the fraction of units where its gradient passes.
    """

    def __init__(self, p: GradDropParams, tasks: list[Task]) -> None:
        super().__init__(SeededParams(space="feature", seed=p.seed), tasks)
        self.leak = p.leak

    def _combine(self, jacobian: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        self.gramian = ctx.all_reduce(jacobian @ jacobian.T).detach()
        shape = ctx.shared.shape
        grads = jacobian.view(len(jacobian), shape[0], -1)  # (T, B, D)
        signal = ctx.all_reduce((grads * ctx.shared.detach().sign().reshape(1, shape[0], -1)).sum(1))  # (T, D)
        purity = 0.5 * (1 + signal.sum(0) / signal.abs().sum(0).clamp(min=1e-30))
        u = torch.rand(purity.shape, generator=_step_generator(self.seed, ctx)).to(purity.device)
        mask = ((purity > u) & (signal > 0)) | ((purity < u) & (signal < 0))  # (T, D)
        keep = self.leak + (1 - self.leak) * mask.to(grads.dtype)
        update = (keep[:, None, :] * grads).sum(0).reshape(-1)
        return update, mask.to(grads.dtype).mean(1)
