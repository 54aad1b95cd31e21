"""MoCo, stochastic multi-objective gradient correction (Fernando et al., ICLR 2023): parameter space."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from ...tasks import Task
from ..base import GRADIENT_PARAMETER, METHODS, Promises
from ..context import StepContext
from ..gradient import Combination, GradientMethod, GradientParams, TaskGradients


@dataclasses.dataclass
class MoCoParams:
    beta: float = 0.1  # step size of the tracked gradients: beta_k = beta / k^beta_sigma
    beta_sigma: float = 0.5
    gamma: float = 0.1  # step size of lambda: gamma_k = gamma / k^gamma_sigma
    gamma_sigma: float = 0.5
    rho: float = 0.0  # l2 regularisation of the lambda subproblem


def project_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of v (n,) onto the probability simplex {x >= 0, Σx = 1} (exact, by sorting)."""
    if len(v) == 0 or not bool(torch.isfinite(v).all()):
        raise ValueError(f"project_simplex: needs a non-empty finite vector, got {v.tolist()}")
    u = torch.sort(v, descending=True).values
    css = torch.cumsum(u, 0) - 1.0
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int((u - css / k > 0).nonzero().max())
    return (v - css[rho] / (rho + 1)).clamp(min=0.0)


def moco_step(y: torch.Tensor, lam: torch.Tensor, J: torch.Tensor, beta: float, gamma: float, rho: float,
              tracked: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One MoCo update (float64): y_t ← y_t − β(y_t − g_t) for the `tracked` rows, then
    λ ← Π_Δ(λ − γ (Y Yᵀ + ρI) λ) over the `seen` tasks (λ = 0 elsewhere). Returns (y, λ)."""
    y = torch.where(tracked[:, None], y - beta * (y - J), y)
    if not bool(seen.any()):
        return y, lam.clone()
    step = lam - gamma * (y @ (y.T @ lam) + rho * lam)
    out = torch.zeros_like(lam)
    out[seen] = project_simplex(step[seen])
    return y, out


@METHODS.register("moco", params=MoCoParams,
                  description="MoCo: tracked task gradients y_t <- y_t - beta_k (y_t - g_t), weights by projected "
                              "gradient on the simplex of lambda^T Y Y^T lambda, update Y^T lambda "
                              "(Fernando et al., ICLR 2023); parameter space.")
class MoCo(GradientMethod):
    r"""Stochastic Multi-objective gradient Correction (MoCo).

    Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective Learning:
    A Provably Convergent Approach", ICLR 2023 (arXiv:2210.12624), Algorithm 1. Stochastic MGDA is biased:
    the min-norm weights of one batch's noisy gradients are not those of the true gradients. MoCo tracks each
    task's gradient and takes a single projected-gradient step on the MGDA weights per iteration k = 1, 2, ...:

        y_t ← y_t − β_k (y_t − g_t)                   tracked gradient of task t (y_t = 0 at start)
        λ ← Π_Δ(λ − γ_k (Y Yᵀ + ρ I) λ)               Y = rows y_t; Π_Δ the Euclidean projection on the simplex
        d = Yᵀλ                                         the trunk update (the paper's x ← x − α Y λ)

    with β_k = β / k^σ_β, γ_k = γ / k^σ_γ and λ = 1/T at start. The reported weights are λ (they sum to 1,
    as the paper's and MGDA's); the update is a combination of the tracked gradients, not of this step's.
    Heads receive the plain sum of their task's gradients (as in LibMTL).

    Defaults: β = γ = 0.1, σ_β = σ_γ = 0.5, ρ = 0, from the authors' released code for their Office-31
    experiments (github.com/heshandevaka/MoCo, LibMTL `Tracking`: beta_track 0.1, delta 0.1, sigma2 0.5,
    sigma3 0.5, no ρ). The paper's own appendix values could not be consulted here.

    Deviations: the paper projects y_t onto a ball of radius L_t (a bound on the task's gradient norm,
    needed by its analysis); the bound is unknown in practice and, as in every released implementation,
    not applied. Parameter space only: y_t averages gradients across steps, which needs a fixed coordinate
    system; at the shared representation the coordinates are (example, unit) pairs of a different batch
    every step (LibMTL also refuses MoCo with rep_grad).

    Other implementations: the authors' Office-31 code multiplies the λ-gradient by 2 (the exact gradient
    of λᵀYᵀYλ; here the paper's form, i.e. their γ is 2γ here) and adds no ρ; their Cityscapes script
    replaces Π_Δ by a softmax and decays the step sizes per epoch. LibMTL's MoCo (from the authors'
    shared code) differs from the paper in three ways: each gradient is rescaled to g_t L_t / ||g_t|| before
    tracking, Π_Δ is replaced by softmax(λ − γ_k(YYᵀ + ρI)λ) (a different map: λ never reaches 0 and
    does not follow the projected-gradient iteration), and its defaults are β = 0.5, γ = 0.1, σ = 0.5,
    ρ = 0. TorchJD 0.18 has no MoCo.

    Absent tasks (loss exactly 0: no labelled sample, g_t = 0) are not a sample of their gradient: y_t is
    kept. A task never present yet has no tracked gradient (y_t = 0 would make it the min-norm point and
    stall training): it gets λ_t = 0 and the others are projected on the simplex among themselves.

    State (declared, checkpointed): Y (`tracked`, T × trunk parameters, sized on first use), λ, which
    tasks have been seen, and the step count k. Parameter space: J is the rank average, so every rank
    holds the same state.
    """

    cost_class = GRADIENT_PARAMETER
    spaces = ("parameter",)
    promises = Promises(weighted_sum=False)

    def __init__(self, p: MoCoParams, tasks: list[Task]) -> None:
        super().__init__(GradientParams(space="parameter"), tasks)
        for name in ("beta", "gamma"):
            value = getattr(p, name)
            if not 0 < value <= (1 if name == "beta" else float("inf")) or value == float("inf"):
                bound = "in (0, 1]" if name == "beta" else "finite and > 0"
                raise ConfigError(f"balancing.{name}: must be {bound}, got {value}")
        for name in ("beta_sigma", "gamma_sigma", "rho"):
            value = getattr(p, name)
            if not 0 <= value < float("inf"):
                raise ConfigError(f"balancing.{name}: must be finite and >= 0, got {value}")
        self.p = p
        n = len(tasks)
        f64 = dict(dtype=torch.float64)
        self.declare_state(tracked=torch.zeros(0, **f64), lam=torch.full((n,), 1.0 / n, **f64),
                           seen=torch.zeros(n, dtype=torch.bool), steps=torch.zeros((), dtype=torch.long))

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        J = grads.matrix
        steps = self.steps + 1
        k = float(steps)
        beta = self.p.beta / k ** self.p.beta_sigma
        gamma = self.p.gamma / k ** self.p.gamma_sigma
        present = (grads.losses != 0).to(J.device)
        seen = self.seen.to(J.device) | present
        y = self.tracked if self.tracked.shape == J.shape else torch.zeros(J.shape, dtype=torch.float64)
        y, lam = moco_step(y.to(J.device), self.lam.to(J.device), J.detach().double(), beta, gamma, self.p.rho,
                           present, seen)
        update = (lam @ y).to(J.dtype)
        return Combination(update, lam, state={"tracked": y, "lam": lam, "seen": seen, "steps": steps})
