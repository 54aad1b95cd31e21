"""The α-fair allocation of the task gradients by damped Newton (FairGrad; Nash-MTL at α = 1)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .solvers import F64, GramianSolverError, as_output, correlation, input_eps, prepare, solve_sym


def alpha_fair_weights(G: Tensor, alpha: float, name: str, *, ridge: float = 1e-12, tol: float = 1e-10,
                       max_iter: int = 500) -> Tensor:
    r"""The α-fair allocation: w > 0 with (G w)_i = w_i^{-1/α} (α = 1: Nash bargaining, Gw = 1/w).

    Exact, no scipy/cvxpy: w is the unique minimiser on w > 0 of the strictly convex
    f(w) = ½ wᵀGw − Σ_i h(w_i), h = log (α = 1) or w^{1−1/α}/(1 − 1/α) (h' = w^{-1/α}). Solved after
    factoring out the global scale m (geometric mean of the norms: G = m²G̃, w = m^{-2α/(α+1)} w̃) in
    correlation form: β = Ñw̃, (Ĝβ)_i = c_i β_i^{-1/α}, c_i = ñ_i^{(1−α)/α} (c = 1 at α = 1, where the
    problem is invariant to per-task scaling). Damped Newton (Hessian Ĝ + diag((c_i/α) β_i^{-1/α−1})) from
    the best point of the ray of 1, a step cap keeping β > 0, Armijo backtracking; full steps once the
    Newton decrement λ² < 1/16 at α = 1 (f is self-concordant there: provably feasible and decreasing)
    or λ² < 1e-8 otherwise (the rounding-limited last steps; they must keep β > 0). Converged when
    max_i |β_i^{1/α}(Ĝβ)_i / c_i − 1| ≤ `tol` plus its rounding error; else `GramianSolverError`.

    A ridge ρ = max(`ridge`, 8·T·eps(G.dtype)) is added to Ĝ (`ridge=0`: none): a solution exists iff 0
    is not in the convex hull of the gradients, and the ridge keeps it bounded near Pareto-stationary
    points. It changes task i's equation by the relative amount ρ·||g_i||²w_i/(g_iᵀd): ρ when the
    gradients are orthogonal, more when a task's own gradient is nearly cancelled by the others'
    (small α with norms spread over orders of magnitude: up to ~1e-2 at α = 0.25, norms 1e-2..1e2).
    Large α with dominated tasks needs weights like exp(−α·const) (1e-140 at α = 20, below the float64
    range at α = 100): slow, then `GramianSolverError`. Zero-gradient tasks get weight 0, the others
    are solved among themselves; G = 0 gives w = 0. Returns w (T,) with G's dtype and device.
    """
    if not (alpha > 0.0 and math.isfinite(alpha)):
        raise ValueError(f"{name}: alpha must be a finite number > 0, got {alpha}")
    if not (ridge >= 0.0):
        raise ValueError(f"{name}: ridge must be >= 0, got {ridge}")
    G0, G = G, prepare(G, name)
    out = torch.zeros(G.shape[0], dtype=F64)
    active, n, H = correlation(G)
    k = active.numel()
    if k == 0:
        return as_output(out, G0)
    m = float(torch.log(n).mean().exp())
    n_t = n / m
    rho = max(ridge, 8.0 * k * input_eps(G0)) if ridge > 0.0 else 0.0
    H = H + rho * torch.eye(k, dtype=F64)
    absH = H.abs()
    one, q = alpha == 1.0, 1.0 / alpha
    c = torch.ones(k, dtype=F64) if one else n_t ** ((1.0 - alpha) / alpha)
    # start on the ray of 1 at its best scale (capped: 1ᵀĜ1 ≈ 0 when the mean direction vanishes)
    beta = torch.full((k,), (float(c.sum()) / max(float(H.sum()), 1e-6 * k)) ** (alpha / (alpha + 1.0)), dtype=F64)

    def f(b: Tensor) -> float:
        util = torch.log(b) if one else b ** (1.0 - q) / (1.0 - q)
        return 0.5 * float(b @ H @ b) - float((c * util).sum())

    def converged(b: Tensor) -> bool:
        scale = b ** q / c
        res = (scale * (H @ b) - 1.0).abs()
        slack = tol + 8.0 * k * 2.0 ** -52 * scale * (absH @ b)
        return bool((res <= slack).all())

    full_step = 0.0625 if one else 1e-8
    fb, done, it = f(beta), converged(beta), 0
    while not done and it < max_iter:
        it += 1
        grad = H @ beta - c * beta ** -q
        hess = H + torch.diag(c * q * beta ** (-q - 1.0))
        sol, info = torch.linalg.solve_ex(hess, grad)
        step = -sol if int(info) == 0 and bool(torch.isfinite(sol).all()) else -solve_sym(hess, grad)
        slope = float(grad @ step)
        if not slope < 0.0:
            break
        if -slope < full_step and bool((beta + step > 0.0).all()):
            beta = beta + step
            fb, done = f(beta), converged(beta)
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
        res = float((beta ** q / c * (H @ beta) - 1.0).abs().max())
        raise GramianSolverError(
            f"{name}: Newton solver did not converge (max |w_i^(1/α) (Gw)_i − 1| = {res:.3g}, α = {alpha:g}, "
            f"tolerance {tol:g}, {it} of at most {max_iter} steps); the gradients may be (nearly) "
            "Pareto-stationary or G badly conditioned")
    out[active] = beta / n_t * m ** (-2.0 * alpha / (alpha + 1.0))
    return as_output(out, G0)
