"""Shared solvers for Gramian-form gradient balancing.

Every Gramian method combines the per-task gradients g_1..g_T (the rows of a Jacobian J, T x N) into one
update d = Jᵀw, and its weight vector w depends on J only through the Gramian G = J Jᵀ (T x T):
g_i . g_j = G_ij, ||g_i||² = G_ii, and any vector cᵀJ has norm² cᵀGc. The gradient space computes G
(summed across data-parallel ranks where needed), the method's solver returns w, and the space applies
d = Jᵀw, so every rank gets the same weights.

Conventions shared by every Gramian solver (the functions in `methods/*.py`, built on these helpers):

* input: a (T, T) tensor G, symmetric positive semi-definite up to rounding (`prepare` symmetrises it);
  a non-square or non-finite G raises ValueError;
* math: float64 on the CPU (G is tiny; one device-to-host copy per call);
* output: w as a (T,) tensor with G's dtype and device (`as_output`; GradVac also returns its EMA state);
* iterative solvers either reach their stated tolerance or raise `GramianSolverError`; nothing
  falls back silently to a different method.

Helpers: `nnls_gram` (Lawson–Hanson active-set NNLS in Gram form), `min_norm_weights` (the exact
min-norm point of the convex hull, by NNLS), `dual_cone_weights` (projections onto the dual cone, by
NNLS: UPGrad, DualProj), `alpha_fair_weights` (the α-fair allocation (Gw)_i = w_i^{-1/α} by damped
Newton: FairGrad, Nash-MTL at α = 1), `solve_sym` (minimum-norm least squares).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import MTLVisionError

F64 = torch.float64
CPU = torch.device("cpu")


class GramianSolverError(MTLVisionError, RuntimeError):
    """An iterative weight solver did not reach its tolerance within its iteration budget."""


def prepare(G: Tensor, name: str) -> Tensor:
    """Validate G and return a symmetrised float64 CPU copy."""
    if not isinstance(G, Tensor):
        raise ValueError(f"{name}: the Gramian must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"{name}: the Gramian must be a non-empty square (T, T) matrix, "
                         f"got shape {tuple(G.shape)}")
    G64 = G.detach().to(device=CPU, dtype=F64)
    if not bool(torch.isfinite(G64).all()):
        raise ValueError(f"{name}: the Gramian has NaN or infinite entries (non-finite task "
                         "gradients)")
    return 0.5 * (G64 + G64.T)


def as_output(w: Tensor, G: Tensor) -> Tensor:
    """The weights in the dtype and on the device of the input Gramian."""
    return w.to(device=G.device, dtype=G.dtype)


def preference(pref: Optional[Tensor], T: int, name: str) -> Tensor:
    """Pre-weights p (T,): `pref` validated as float64, or 1/T."""
    if pref is None:
        return torch.full((T,), 1.0 / T, dtype=F64)
    p = torch.as_tensor(pref).detach().to(device=CPU, dtype=F64).reshape(-1)
    if p.numel() != T:
        raise ValueError(f"{name}: pref must have one entry per task ({T}), got {p.numel()}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name}: pref has NaN or infinite entries")
    return p


def input_eps(G: Tensor) -> float:
    """Machine epsilon of G's (input) dtype: the precision the Gramian was computed in."""
    return torch.finfo(G.dtype).eps if G.dtype.is_floating_point else 2.0 ** -52


def mean_diag(G: Tensor) -> float:
    """Mean squared task-gradient norm: the scale used to normalise G to O(1) entries."""
    return float(G.diagonal().clamp(min=0.0).mean())


def solve_sym(A: Tensor, b: Tensor) -> Tensor:
    """Minimum-norm least-squares solution of A x = b for a small symmetric A (SVD based)."""
    return torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def correlation(G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For a prepared G: the tasks with a gradient (norm > 1e-12 × the largest; none if G = 0), their
    norms n and their correlation matrix C = N⁻¹GN⁻¹ (symmetrised)."""
    norms = G.diagonal().clamp(min=0.0).sqrt()
    active = (norms > 1e-12 * float(norms.max())).nonzero().squeeze(-1)
    n = norms[active]
    C = G[active][:, active] / torch.outer(n, n)
    return active, n, 0.5 * (C + C.T)


def nnls_gram(Q: Tensor, c: Tensor, tol: float, max_iter: int, name: str) -> Tensor:
    """Lawson–Hanson active-set NNLS in Gram form: argmin_{x >= 0} ½ xᵀQx − cᵀx (Q PSD).

    For a least-squares problem min ||A x − b||² one passes Q = AᵀA and c = Aᵀb; only these are
    needed, so the solver works from a Gramian. Finite termination; `tol` bounds the dual
    residual max_j (c − Qx)_j over the zero set at exit.
    """
    T = Q.shape[0]
    x = torch.zeros(T, dtype=F64)
    passive = torch.zeros(T, dtype=torch.bool)
    blocked = torch.zeros(T, dtype=torch.bool)  # degenerate candidates, retried after x changes
    w = c.clone()
    iters = 0
    while True:
        cand = (~passive) & (~blocked) & (w > tol)
        if not bool(cand.any()):
            break
        j = int(torch.where(cand, w, torch.full_like(w, -math.inf)).argmax())
        passive[j] = True
        first = True
        while True:
            iters += 1
            if iters > max_iter:
                raise GramianSolverError(
                    f"{name}: active-set (Lawson–Hanson) solver did not terminate in {max_iter} "
                    "iterations; the Gramian is probably badly conditioned")
            idx = passive.nonzero().squeeze(-1)
            z = torch.zeros(T, dtype=F64)
            z[idx] = solve_sym(Q[idx][:, idx], c[idx])
            if first and float(z[j]) <= 0.0:
                # The column just added cannot enter (numerically dependent on the passive set):
                # leave x unchanged and exclude j until x changes (the classic LH safeguard).
                passive[j] = False
                blocked[j] = True
                break
            first = False
            bad = passive & (z <= 0.0)
            if not bool(bad.any()):
                x = z
                blocked.zero_()
                break
            ratios = x[bad] / (x[bad] - z[bad])
            alpha = float(ratios.min())
            x = x + alpha * (z - x)
            bad_idx = bad.nonzero().squeeze(-1)
            drop = torch.zeros(T, dtype=torch.bool)
            drop[bad_idx[ratios <= alpha]] = True
            drop |= passive & (x <= 0.0)
            x[drop] = 0.0
            passive &= ~drop
            blocked.zero_()
        w = c - Q @ x
    return x


def min_norm_weights(Q: Tensor, name: str) -> Tensor:
    """Exact minimiser of wᵀQw over the simplex (the min-norm point of the convex hull).

    Lifting each g_i to (g_i, 1), the projection of (0, 1) onto the cone they generate is
    x* = argmin_{x >= 0} ||Σ x_i g_i||² + (Σ x_i − 1)², and w* = x*/Σx* (Lawson & Hanson's LDP
    reduction). In Gram form that is NNLS with Q + 11ᵀ and c = 1, solved by `nnls_gram`.
    Q is normalised by its mean diagonal first (the minimiser is scale-invariant).
    """
    T = Q.shape[0]
    s = mean_diag(Q)
    if s <= 0.0:
        return torch.full((T,), 1.0 / T, dtype=F64)
    Qn = Q / s + torch.ones(T, T, dtype=F64)
    x = nnls_gram(Qn, torch.ones(T, dtype=F64), tol=1e-13, max_iter=50 * T + 50, name=name)
    total = float(x.sum())
    if not total > 0.0:
        raise GramianSolverError(f"{name}: min-norm solver returned a zero vector")
    return x / total


def dual_cone_weights(G: Tensor, U: Tensor, name: str, *, ridge: float = 1e-12,
                      tol: float = 1e-13) -> Tensor:
    r"""Weights of the projections of Jᵀu onto the dual cone C = {x : Jx ≥ 0}, for each row u of U (K, T).

    Quinton & Rey 2024, Proposition 1: π_C(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv = u + λ,
    λ = argmin_{λ ≥ 0} ½(u + λ)ᵀG(u + λ): NNLS in Gram form (Q = G, c = −Gu) by `nnls_gram`. Returns V
    (K, T), float64 on the CPU; d = Jᵀv has d·g_j = (Gv)_j ≥ 0.

    The cone does not change when a gradient is rescaled, so the QP is solved in correlation form
    (variables Nv, N = diag ||g_i||) with a ridge ρ = max(`ridge`, 8·T·eps(G.dtype)) added to the
    correlation matrix (`ridge=0`: the exact projection): the exact projection for the rows
    [g_i, √ρ ||g_i|| e_i], bounded weights when G is (nearly) singular, at the cost of
    d·g_j ≥ −ρ ||g_j||² v_j and an O(ρ) change of d. Zero-gradient tasks keep v_i = u_i.
    """
    if not (ridge >= 0.0):
        raise ValueError(f"{name}: ridge must be >= 0, got {ridge}")
    G0, G = G, prepare(G, name)
    T = G.shape[0]
    U = torch.as_tensor(U).detach().to(device=CPU, dtype=F64).reshape(-1, T)
    V = U.clone()
    if mean_diag(G) <= 0.0:
        return V
    rho = max(ridge, 8.0 * T * input_eps(G0)) if ridge > 0.0 else 0.0
    active, n, C = correlation(G)
    k = active.numel()
    C = C + rho * torch.eye(k, dtype=F64)
    cmax = float(C.diagonal().max())
    for r in range(V.shape[0]):
        u = U[r, active] * n                          # v̂ = N v ≥ N u
        umax = float(u.abs().max())
        if umax == 0.0:
            continue
        lam = nnls_gram(C, -(C @ u), tol=tol * cmax * umax, max_iter=50 * k + 50, name=name)
        V[r, active] = (u + lam) / n
    return V


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
