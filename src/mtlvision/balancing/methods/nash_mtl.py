"""Nash-MTL (Navon et al., ICML 2022): its Gramian solver and its registration."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..solvers import F64, GramianSolverError, as_output, input_eps, prepare, solve_sym


def nash_mtl(G: Tensor, *, ridge: float = 1e-12, tol: float = 1e-10, max_iter: int = 500) -> Tensor:
    r"""Nash-MTL weights: the Nash bargaining solution.

    Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022. The update d = Σ α_i g_i
    with α > 0 solving Gα = 1/α elementwise, i.e. g_iᵀd = 1/α_i (the paper's Theorem 5.1); then
    ||d||² = αᵀGα = T.

    Solver (exact, no cvxpy; the official code runs a 20-step sequence of convex approximations
    with ECOS): α is the unique minimiser of the strictly convex, self-concordant
    f(α) = ½ αᵀGα − Σ log α_i on α > 0 (its gradient Gα − 1/α vanishes exactly at the bargaining
    solution). Damped Newton with Hessian G + diag(1/α²), a step cap keeping α > 0 and Armijo
    backtracking; converged when max_i |α_i (Gα)_i − 1| ≤ `tol` plus the rounding error of
    evaluating it (≈ T·eps·α_i (|G||α|)_i, only noticeable when α is huge). Non-convergence in
    `max_iter` steps raises `GramianSolverError` (no silent fallback).

    Conditioning: the solution is equivariant to per-task gradient scaling (g_i → s_i g_i gives
    α_i → α_i/s_i, same d), so the problem is solved on the correlation matrix
    Ĝ = D^{-1/2} G D^{-1/2} (D = diag G) as Ĝβ = 1/β, α = D^{-1/2}β, with a ridge: (Ĝ + ρI)β = 1/β,
    ρ = max(`ridge`, 8·T·eps(G.dtype)): 1e-12 for float64 input, ~1e-6·T for float32 input
    (whose rounding already perturbs Ĝ that much and can make it slightly indefinite); `ridge=0`
    disables it. The exact solution exists iff 0 is not in the convex hull of the gradients; the
    ridge keeps the problem solvable at Pareto-stationary points (e.g. g_2 = −g_1, where d → 0)
    and changes β_i(Ĝβ)_i by ρβ_i², negligible since β = O(1) unless the gradients are nearly
    Pareto-stationary (β grows like 1/distance of 0 to their normalised hull). Singular G with a
    solution (e.g. two identical gradients) needs no ridge: the Hessian is positive definite. Tasks with a
    zero gradient (norm ≤ 1e-12 × the largest) have no bargaining utility; they get weight 0 and
    the others are solved among themselves. G = 0 returns w = 0.

    Differences from the official code: it solves approximately (a few convex-approximation steps,
    stopping at ||Gα − 1/α|| < 1e-3 on the Frobenius-normalised G, warm-started from the previous
    step's α), and clips the final gradient norm (max_norm = 1.0 by default); both are left to
    the caller here.
    """
    if not (ridge >= 0.0):
        raise ValueError(f"nash_mtl: ridge must be >= 0, got {ridge}")
    G0 = G
    G = prepare(G, "nash_mtl")
    T = G.shape[0]
    out = torch.zeros(T, dtype=F64)
    norms = G.diagonal().clamp(min=0.0).sqrt()
    nmax = float(norms.max())
    if nmax <= 0.0:
        return as_output(out, G0)
    active = (norms > 1e-12 * nmax).nonzero().squeeze(-1)
    k = active.numel()
    n = norms[active]
    H0 = G[active][:, active] / torch.outer(n, n)
    rho = max(ridge, 8.0 * k * input_eps(G0)) if ridge > 0.0 else 0.0
    H0 = 0.5 * (H0 + H0.T) + rho * torch.eye(k, dtype=F64)
    absH = H0.abs()
    # start on the ray of 1 at its best scale (capped: 1ᵀĜ1 ≈ 0 when the mean direction vanishes)
    beta = torch.ones(k, dtype=F64) * math.sqrt(k / max(float(H0.sum()), 1e-6 * k))

    def f(b: Tensor) -> float:
        return 0.5 * float(b @ H0 @ b) - float(torch.log(b).sum())

    def converged(b: Tensor) -> bool:
        res = (b * (H0 @ b) - 1.0).abs()
        slack = tol + 8.0 * k * 2.0 ** -52 * b * (absH @ b)
        return bool((res <= slack).all())

    fb = f(beta)
    done = converged(beta)
    it = 0
    while not done and it < max_iter:
        it += 1
        grad = H0 @ beta - 1.0 / beta
        hess = H0 + torch.diag(1.0 / beta ** 2)
        sol, info = torch.linalg.solve_ex(hess, grad)
        step = -sol if int(info) == 0 and bool(torch.isfinite(sol).all()) else -solve_sym(hess, grad)
        slope = float(grad @ step)
        if not slope < 0.0:
            break
        if -slope < 0.0625:
            # Newton decrement < 1/4: inside the quadratic-convergence region of a self-concordant
            # function, where the full step is feasible and accepted (no rounding-prone search).
            beta = beta + step
            fb = f(beta)
            done = converged(beta)
            continue
        t = 1.0
        neg = step < 0.0
        if bool(neg.any()):
            t = min(1.0, 0.99 * float((-beta[neg] / step[neg]).min()))
        accepted = False
        for _ in range(60):
            cand = beta + t * step
            if bool((cand > 0.0).all()):
                fc = f(cand)
                if fc <= fb + 0.25 * t * slope:
                    accepted = True
                    break
            t *= 0.5
        if not accepted:
            break
        beta, fb = cand, fc
        done = converged(beta)
    if not done:
        res = float((beta * (H0 @ beta) - 1.0).abs().max())
        raise GramianSolverError(
            f"nash_mtl: Newton solver did not converge (max |α_i (Gα)_i − 1| = {res:.3g}, "
            f"tolerance {tol:g}, {it} of at most {max_iter} steps); the gradients may be "
            "(nearly) Pareto-stationary or G badly conditioned")
    out[active] = beta / n
    return as_output(out, G0)


@METHODS.register("nash_mtl", params=GradientParams,
                  description="Nash-MTL: bargaining solution (G w)_i = 1/w_i, solved exactly by Newton "
                              "(Navon et al., ICML 2022).")
class NashMTL(GramianWeighting):
    """Nash-MTL weights (`nash_mtl`) on the step's Gramian."""

    promises = Promises(non_conflicting=True, scaling="update")
    solver = staticmethod(nash_mtl)
