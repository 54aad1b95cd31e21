"""Nash-MTL (Navon et al., ICML 2022): its Gramian solver and its registration."""
from __future__ import annotations

from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..alpha_fair import alpha_fair_weights


def nash_mtl(G: Tensor, *, ridge: float = 1e-12, tol: float = 1e-10, max_iter: int = 500) -> Tensor:
    r"""Nash-MTL weights: the Nash bargaining solution.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022. The update d = Σ α_i g_i
    with α > 0 solving Gα = 1/α elementwise, i.e. g_iᵀd = 1/α_i (the paper's Theorem 5.1); then
    ||d||² = αᵀGα = T. This is the α-fair allocation (Gw)_i = w_i^{-1/α} at α = 1 (FairGrad,
    Ban & Ji 2024), solved by `alpha_fair.alpha_fair_weights`.

    Solver (exact, no cvxpy; the official code runs a 20-step sequence of convex approximations
    with ECOS): α is the unique minimiser of the strictly convex, self-concordant
    f(α) = ½ αᵀGα − Σ log α_i on α > 0 (its gradient Gα − 1/α vanishes exactly at the bargaining
    solution), by damped Newton; converged when max_i |α_i (Gα)_i − 1| ≤ `tol` plus the rounding
    error of evaluating it. Non-convergence in `max_iter` steps raises `GramianSolverError` (no
    silent fallback).

    Conditioning: the solution is equivariant to per-task gradient scaling (g_i → s_i g_i gives
    α_i → α_i/s_i, same d), so the problem is solved on the correlation matrix
    Ĝ = D^{-1/2} G D^{-1/2} (D = diag G) as Ĝβ = 1/β, α = D^{-1/2}β, with a ridge: (Ĝ + ρI)β = 1/β,
    ρ = max(`ridge`, 8·T·eps(G.dtype)): 1e-12 for float64 input, ~1e-6·T for float32 input
    (whose rounding already perturbs Ĝ that much and can make it slightly indefinite); `ridge=0`
    disables it. The exact solution exists iff 0 is not in the convex hull of the gradients; the
    ridge keeps the problem solvable at Pareto-stationary points (e.g. g_2 = −g_1, where d → 0)
    and changes β_i(Ĝβ)_i by ρβ_i², negligible since β = O(1) unless the gradients are nearly
    Pareto-stationary. Singular G with a solution (e.g. two identical gradients) needs no ridge.
    Tasks with a zero gradient (norm ≤ 1e-12 × the largest) have no bargaining utility; they get
    weight 0 and the others are solved among themselves. G = 0 returns w = 0.

    Differences from the official code: it solves approximately (a few convex-approximation steps,
    stopping at ||Gα − 1/α|| < 1e-3 on the Frobenius-normalised G, warm-started from the previous
    step's α), and clips the final gradient norm (max_norm = 1.0 by default); both are left to
    the caller here.
    """
    return alpha_fair_weights(G, 1.0, "nash_mtl", ridge=ridge, tol=tol, max_iter=max_iter)


@METHODS.register("nash_mtl", params=GradientParams,
                  description="Nash-MTL: bargaining solution (G w)_i = 1/w_i, solved exactly by Newton "
                              "(Navon et al., ICML 2022).")
class NashMTL(GramianWeighting):
    """Nash-MTL weights (`nash_mtl`) on the step's Gramian."""

    promises = Promises(non_conflicting=True, scaling="update")
    solver = staticmethod(nash_mtl)
