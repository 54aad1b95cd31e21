"""Gradient-balancing methods: each one a function of the task Gramian (see `gramian.py`), applied
through `GradientBalancer` in feature space (default) or parameter space."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from ..rng import keyed_generator
from ..tasks import Task
from . import gramian
from .base import METHODS, StepContext
from .gradient import GradientBalancer, GradientParams


def _step_generator(seed: int, ctx: StepContext) -> torch.Generator:
    """Random task orders from (seed, epoch, step): reproducible, resumable, equal on every rank."""
    return keyed_generator(seed, ctx.epoch, ctx.step)


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
        self._record_gramian(jacobian, ctx)
        activation = ctx.shared_matrix()  # (B, D)
        grads = jacobian.view(len(jacobian), len(activation), -1)  # (T, B, D)
        signal = ctx.all_reduce((grads * activation.sign()[None]).sum(1))  # (T, D)
        purity = 0.5 * (1 + signal.sum(0) / signal.abs().sum(0).clamp(min=1e-30))
        u = torch.rand(purity.shape, generator=_step_generator(self.seed, ctx)).to(purity.device)
        mask = ((purity > u) & (signal > 0)) | ((purity < u) & (signal < 0))  # (T, D)
        keep = self.leak + (1 - self.leak) * mask.to(grads.dtype)
        update = (keep[:, None, :] * grads).sum(0).reshape(-1)
        return update, mask.to(grads.dtype).mean(1)


@dataclasses.dataclass
class GradNormParams(GradientParams):
    alpha: float = 1.5  # asymmetry: how strongly slow tasks are pushed (paper's default range 0.12-3)


@METHODS.register("gradnorm", params=GradNormParams,
                  description="GradNorm: learn task weights so weighted gradient norms follow relative "
                              "training rates (Chen et al., ICML 2018).")
class GradNorm(GradientBalancer):
    r"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1).

    Learnable weights w_i (start 1) scale the task losses: the network is trained on Σ_i w_i L_i. With
    n_i = ||∇_W L_i|| read off the Gramian (n_i = sqrt(G_ii); W = the shared representation in feature
    space, the trunk parameters in parameter space; the paper uses the last shared layer),

        G_i = w_i n_i,  Ḡ = mean_i G_i,  L̃_i = L_i(t) / L_i(0),  r_i = L̃_i / mean_j L̃_j
        L_grad = Σ_i | G_i − Ḡ r_i^α |          (the target Ḡ r_i^α is held constant)

    ∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) n_i becomes w's gradient, which the main optimiser applies
    (the paper uses one optimiser for both); w is renormalised to Σ_i w_i = T before each step.
    L_i(0) is each task's first non-zero loss.
    """

    weight_task_grads = True

    def __init__(self, p: GradNormParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.alpha = p.alpha
        self.w = torch.nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial", torch.zeros(len(tasks), dtype=torch.float64))
        self._losses: Optional[torch.Tensor] = None

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        with torch.no_grad():
            self.w.clamp_(min=1e-4).mul_(len(self.w) / self.w.sum())
            current = torch.stack([losses[n].detach() for n in self.task_names]).double()
            fresh = (self.initial == 0) & (current > 0)
            self.initial.copy_(torch.where(fresh, current, self.initial))
        self._losses = current
        return super().backward(losses, ctx)

    def weights(self, G: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n = G.detach().double().diagonal().clamp(min=0).sqrt()
        w = self.w.detach().double()
        scaled = w * n
        ratio = torch.where(self.initial > 0, self._losses / self.initial.clamp(min=1e-12), torch.ones_like(n))
        target = scaled.mean() * (ratio / ratio.mean()) ** self.alpha
        self.w.grad = (torch.sign(scaled - target) * n).to(self.w.dtype)
        return w.to(G.dtype)


@dataclasses.dataclass
class DBMTLParams:
    beta: float = 0.9  # EMA factor of the gradients
    beta_sigma: float = 0.0  # decay: beta_k = beta / k^beta_sigma
    eps: float = 1e-8  # inside log(L_t + eps)


@METHODS.register("db_mtl", params=DBMTLParams,
                  description="DB-MTL: log-transformed losses + EMA gradients scaled to the largest norm "
                              "(Lin et al., 2023); parameter space.")
class DBMTL(GradientBalancer):
    r"""Dual-Balancing Multi-Task Learning (Lin, Ye, Xu, Shi & Zhang, 2023).

    Loss-scale balancing: each task contributes log(L_t + eps). Gradient-magnitude balancing: an
    exponential moving average ĝ_t ← β_k ĝ_t + (1 − β_k) ∇ log(L_t + eps), β_k = β / k^σ, and the update

        d = Σ_t (max_j ||ĝ_j|| / ||ĝ_t||) ĝ_t

    gives every task the largest gradient magnitude. The average is over steps of the same parameter
    vector, so this method works in parameter space (T backward passes through the trunk); task
    heads receive the plain sum of ∇ log(L_t + eps).
    """

    def __init__(self, p: DBMTLParams, tasks: list[Task]) -> None:
        super().__init__(GradientParams(space="parameter"), tasks)
        self.beta, self.beta_sigma, self.eps = p.beta, p.beta_sigma, p.eps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("average", torch.zeros(0))

    def transform(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: torch.log(v + self.eps) for n, v in losses.items()}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        if prefix + "average" in state_dict:  # the average is sized on first use: match the checkpoint
            self.average = torch.empty_like(state_dict[prefix + "average"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _combine(self, jacobian: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        self._record_gramian(jacobian, ctx)
        self.steps += 1
        if self.average.shape != jacobian.shape:
            self.average = torch.zeros_like(jacobian)
        beta = self.beta / float(self.steps) ** self.beta_sigma
        self.average.mul_(beta).add_(jacobian.detach(), alpha=1 - beta)
        norms = self.average.norm(dim=1)
        w = norms.max() / norms.clamp(min=1e-30)
        return w @ self.average, w
