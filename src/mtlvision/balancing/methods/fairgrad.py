"""FairGrad (Ban & Ji, ICML 2024): its Gramian solver and its registration."""
from __future__ import annotations

import dataclasses
import math

from torch import Tensor

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..gradient import GradientParams, GramianWeighting
from ..alpha_fair import alpha_fair_weights


def fairgrad(G: Tensor, alpha: float = 2.0, *, ridge: float = 1e-12, tol: float = 1e-10,
             max_iter: int = 500) -> Tensor:
    r"""FairGrad weights: the α-fair allocation of the tasks' loss decreases.

    Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024. The update d maximises the
    α-fair utility Σ_i u_α(g_iᵀd) of the tasks' first-order loss decreases over a ball
    (u_α(x) = x^{1−α}/(1−α), log x at α = 1); its KKT conditions give d = Σ_i w_i g_i with w > 0 and

        (G w)_i = g_iᵀd = w_i^{-1/α}   for every task i   (the paper's Eq. 4, Algorithm 1),

    so every task's loss decreases (g_iᵀd > 0). α = 1 is Nash-MTL's condition Gw = 1/w (proportional
    fairness; `nash_mtl` is this function at α = 1); α → ∞ approaches max-min fairness; α = 0 would be
    the plain sum (`equal`), excluded here as the equation is then undefined.

    Solver: `alpha_fair.alpha_fair_weights`, exact damped Newton on a strictly convex potential whose
    gradient is Gw − w^{-1/α} (see there: correlation form, ridge, zero-gradient tasks get weight 0,
    `GramianSolverError` if it does not converge).

    Scaling: multiplying all gradients by s scales w by s^{-2α/(α+1)} (d by s^{(1−α)/(1+α)}); scaling
    one task changes the allocation unless α = 1 (the fairness is between the tasks' absolute
    decreases g_iᵀd).

    Differences from the official code (OptMN-Lab/fairgrad, `methods/weight_methods.py`): it solves
    Gw − w^{-1/α} = 0 approximately with scipy's `least_squares` (trust-region reflective, bounds
    w ≥ 0, from w = 1/T, default tolerances 1e-8, no convergence check), as do LibMTL and TorchJD;
    here the same equation is solved to `tol` (1e-10 relative) or an error is raised. The official
    code takes gradients w.r.t. the shared parameters only (`space: parameter` here; `space: feature`
    is the feature-space surrogate as for the other gradient methods).
    """
    return alpha_fair_weights(G, alpha, "fairgrad", ridge=ridge, tol=tol, max_iter=max_iter)


@dataclasses.dataclass
class FairGradParams(GradientParams):
    # α of the α-fairness; 2.0 is what the authors' run scripts use on every benchmark (CelebA,
    # Cityscapes, NYU-v2, QM9, Meta-World MT10)
    alpha: float = 2.0


@METHODS.register("fairgrad", params=FairGradParams,
                  description="FairGrad: α-fair allocation (G w)_i = w_i^(-1/α), solved exactly by Newton; "
                              "α = 1 is Nash-MTL (Ban & Ji, ICML 2024).")
class FairGrad(GramianWeighting):
    """FairGrad weights (`fairgrad`) with the configured `alpha`."""

    # g_iᵀd = w_i^{-1/α} > 0; per-task loss scaling changes the allocation unless α = 1
    promises = Promises(non_conflicting=True)

    def __init__(self, p: FairGradParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        if not (p.alpha > 0.0 and math.isfinite(p.alpha)):
            raise ConfigError(f"balancing.alpha: must be a finite number > 0 (the α of α-fairness; "
                              f"1 is Nash-MTL), got {p.alpha}")
        self.alpha = p.alpha

    def weights(self, G: Tensor, ctx: StepContext) -> Tensor:
        return fairgrad(G, self.alpha)
