"""Gradient-balancing weights computed from the task Gramian alone.

Every gradient method here combines the per-task gradients g_1..g_T (the rows of a Jacobian J,
T x N) into one update d = J^T w, and the weight vector w depends on J only through the Gramian
G = J J^T (T x T): g_i . g_j = G_ij, ||g_i||^2 = G_ii, and any vector c^T J has norm^2 c^T G c.
The trainer computes G (possibly summed across data-parallel ranks with `all_reduce`), calls one
of the functions below and applies d = J^T w itself, so every rank gets the same weights.

Conventions shared by all functions:

* input: a (T, T) tensor G, symmetric positive semi-definite up to rounding (it is symmetrised);
  a non-square or non-finite G raises ValueError;
* math: float64 on the CPU (G is tiny; one device-to-host copy per call);
* output: w as a (T,) tensor with G's dtype and device (GradVac also returns its EMA state);
* iterative solvers either reach their stated tolerance or raise `GramianSolverError`; nothing
  falls back silently to a different method.

Methods (each docstring cites the paper, states the Gramian form and any deviation):
`mgda`, `pcgrad`, `cagrad`, `imtl_g`, `nash_mtl`, `upgrad`, `aligned_mtl`, `gradvac`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..errors import MTLVisionError

__all__ = [
    "GramianSolverError",
    "aligned_mtl",
    "cagrad",
    "gradvac",
    "imtl_g",
    "mgda",
    "nash_mtl",
    "pcgrad",
    "upgrad",
]

_F64 = torch.float64
_CPU = torch.device("cpu")


class GramianSolverError(MTLVisionError, RuntimeError):
    """An iterative weight solver did not reach its tolerance within its iteration budget."""


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def _prepare(G: Tensor, name: str) -> Tensor:
    """Validate G and return a symmetrised float64 CPU copy."""
    if not isinstance(G, Tensor):
        raise ValueError(f"{name}: the Gramian must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() != 2 or G.shape[0] != G.shape[1] or G.shape[0] == 0:
        raise ValueError(f"{name}: the Gramian must be a non-empty square (T, T) matrix, "
                         f"got shape {tuple(G.shape)}")
    G64 = G.detach().to(device=_CPU, dtype=_F64)
    if not bool(torch.isfinite(G64).all()):
        raise ValueError(f"{name}: the Gramian has NaN or infinite entries (non-finite task "
                         "gradients)")
    return 0.5 * (G64 + G64.T)


def _out(w: Tensor, G: Tensor) -> Tensor:
    return w.to(device=G.device, dtype=G.dtype)


def _pref(pref: Optional[Tensor], T: int, name: str) -> Tensor:
    if pref is None:
        return torch.full((T,), 1.0 / T, dtype=_F64)
    p = torch.as_tensor(pref).detach().to(device=_CPU, dtype=_F64).reshape(-1)
    if p.numel() != T:
        raise ValueError(f"{name}: pref must have one entry per task ({T}), got {p.numel()}")
    if not bool(torch.isfinite(p).all()):
        raise ValueError(f"{name}: pref has NaN or infinite entries")
    return p


def _eps(G: Tensor) -> float:
    """Machine epsilon of G's (input) dtype: the precision the Gramian was computed in."""
    return torch.finfo(G.dtype).eps if G.dtype.is_floating_point else 2.0 ** -52


def _mean_diag(G: Tensor) -> float:
    """Mean squared task-gradient norm: the scale used to normalise G to O(1) entries."""
    return float(G.diagonal().clamp(min=0.0).mean())


def _solve_sym(A: Tensor, b: Tensor) -> Tensor:
    """Minimum-norm least-squares solution of A x = b for a small symmetric A (SVD based)."""
    return torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


def _nnls_gram(Q: Tensor, c: Tensor, tol: float, max_iter: int, name: str) -> Tensor:
    """Lawson–Hanson active-set NNLS in Gram form: argmin_{x >= 0} ½ xᵀQx − cᵀx (Q PSD).

    For a least-squares problem min ||A x − b||² one passes Q = AᵀA and c = Aᵀb; only these are
    needed, so the solver works from a Gramian. Finite termination; `tol` bounds the dual
    residual max_j (c − Qx)_j over the zero set at exit.
    """
    T = Q.shape[0]
    x = torch.zeros(T, dtype=_F64)
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
            z = torch.zeros(T, dtype=_F64)
            z[idx] = _solve_sym(Q[idx][:, idx], c[idx])
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


def _min_norm_weights(Q: Tensor, name: str) -> Tensor:
    """Exact minimiser of wᵀQw over the simplex (the min-norm point of the convex hull).

    Lifting each g_i to (g_i, 1), the projection of (0, 1) onto the cone they generate is
    x* = argmin_{x >= 0} ||Σ x_i g_i||² + (Σ x_i − 1)², and w* = x*/Σx* (Lawson & Hanson's LDP
    reduction). In Gram form that is NNLS with Q + 11ᵀ and c = 1, solved by `_nnls_gram`.
    Q is normalised by its mean diagonal first (the minimiser is scale-invariant).
    """
    T = Q.shape[0]
    s = _mean_diag(Q)
    if s <= 0.0:
        return torch.full((T,), 1.0 / T, dtype=_F64)
    Qn = Q / s + torch.ones(T, T, dtype=_F64)
    x = _nnls_gram(Qn, torch.ones(T, dtype=_F64), tol=1e-13, max_iter=50 * T + 50, name=name)
    total = float(x.sum())
    if not total > 0.0:
        raise GramianSolverError(f"{name}: min-norm solver returned a zero vector")
    return x / total


# ----------------------------------------------------------------------------------------------
# MGDA
# ----------------------------------------------------------------------------------------------

def mgda(G: Tensor, *, max_iter: int = 250, tol: float = 1e-5, exact: bool = True) -> Tensor:
    r"""MGDA weights: the min-norm point of the convex hull of the task gradients.

    Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
    (MGDA of Désidéri 2012). The common descent direction is d = Σ_t w_t g_t with

        w = argmin_{w ∈ Δ_T} ||Σ_t w_t g_t||² = argmin_{w ∈ Δ_T} wᵀ G w,

    Δ_T the probability simplex. Solver: the paper's Algorithm 2 (Frank–Wolfe). Start from
    w = 1/T; repeat: t̂ = argmin_r (G w)_r; exact line search on the segment between the current
    point θ̄ = Jᵀw and θ = g_t̂ by the paper's Algorithm 1 — with a = θᵀθ̄ = (Gw)_t̂,
    b = θ̄ᵀθ̄ = wᵀGw, c = θᵀθ = G_t̂t̂: γ = 1 if a ≥ c, γ = 0 if a ≥ b, otherwise
    γ = (b − a)/(b + c − 2a); w ← (1 − γ) w + γ e_t̂; stop when γ < `tol` or after `max_iter`
    iterations. For T = 2 the first step is already the exact minimiser on the segment.

    Frank–Wolfe converges only at rate O(1/k), so with `exact=True` (default; not part of the
    paper) the FW iterate is then replaced by the exact minimiser of the same problem, computed by
    an active-set solve (Lawson–Hanson NNLS on the lifted problem, see `_min_norm_weights`), if
    that has the lower objective (it always does up to rounding). `exact=False` returns the
    paper's FW iterate unchanged (this is what TorchJD's `MGDAWeighting(epsilon=tol,
    max_iters=max_iter)` computes). The official code's optional gradient normalisation
    ('l2', 'loss', 'loss+') is not applied: normalise G beforehand if wanted. Returns w ≥ 0,
    Σw = 1. If G = 0 (all gradients zero) returns 1/T.
    """
    G0 = G
    G = _prepare(G, "mgda")
    T = G.shape[0]
    if T == 1:
        return _out(torch.ones(1, dtype=_F64), G0)
    # Plain Python floats: T is tiny and the loop is sequential (much faster than tensor ops).
    Gl = G.tolist()
    wl = [1.0 / T] * T
    Gw = [sum(row) / T for row in Gl]
    b = sum(Gw) / T                                  # wᵀGw
    for _ in range(max_iter):
        t = min(range(T), key=Gw.__getitem__)
        a = Gw[t]
        c = Gl[t][t]
        if a >= c:
            gamma = 1.0
        elif a >= b:
            gamma = 0.0
        else:
            gamma = (b - a) / (b + c - 2.0 * a)
        keep = 1.0 - gamma
        wl = [keep * x for x in wl]
        wl[t] += gamma
        col = Gl[t]
        Gw = [keep * x + gamma * y for x, y in zip(Gw, col)]
        b = keep * keep * b + 2.0 * gamma * keep * a + gamma * gamma * c
        if gamma < tol:
            break
    w = torch.tensor(wl, dtype=_F64)
    if exact:
        w_exact = _min_norm_weights(G, "mgda")
        fw_obj = float(w @ G @ w)
        ex_obj = float(w_exact @ G @ w_exact)
        if ex_obj <= fw_obj + 1e-12 * max(_mean_diag(G), 1e-300):
            w = w_exact
    return _out(w, G0)


# ----------------------------------------------------------------------------------------------
# PCGrad
# ----------------------------------------------------------------------------------------------

def pcgrad(G: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""PCGrad weights (projecting conflicting gradients).

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each task
    i, g_i^PC ← g_i; for each other task j in random order, if g_i^PC · g_j < 0 then
    g_i^PC ← g_i^PC − (g_i^PC · g_j)/||g_j||² g_j; the update is d = Σ_i g_i^PC.

    Gramian form: write g_i^PC = Σ_k C_ik g_k, starting from C_i = e_i. Then g_i^PC · g_j =
    (C_i G)_j, and a projection subtracts (C_i G)_j / G_jj from C_ij. The weights are
    w = Σ_i C_i (column sums of C), so d = Jᵀw.

    Randomness: for each i independently, a permutation of 0..T−1 is drawn with
    ``torch.randperm(T, generator=generator)`` and i is skipped (a uniformly random order of the
    other tasks; the same draws as TorchJD's PCGrad when seeded alike). `generator=None` uses
    torch's global RNG. Deviation notes: the update is the paper's sum; the popular PyTorch port
    (WeiChengTseng/Pytorch-PCGrad) averages instead (w/T). Tasks with a zero gradient are never
    projected on (they cannot conflict).
    """
    G0 = G
    G = _prepare(G, "pcgrad")
    T = G.shape[0]
    C = torch.eye(T, dtype=_F64)
    for i in range(T):
        perm = torch.randperm(T, generator=generator).tolist()
        cG = G[i].clone()  # (C_i G)_k = g_i^PC . g_k
        for j in perm:
            if j == i:
                continue
            dot = float(cG[j])
            gjj = float(G[j, j])
            if dot < 0.0 and gjj > 0.0:
                coef = dot / gjj
                C[i, j] -= coef
                cG -= coef * G[j]
    return _out(C.sum(dim=0), G0)


# ----------------------------------------------------------------------------------------------
# CAGrad
# ----------------------------------------------------------------------------------------------

def cagrad(G: Tensor, c: float = 0.4, *, rescale: bool = False, tol: float = 1e-12,
           max_iter: int = 200) -> Tensor:
    r"""CAGrad weights (conflict-averse gradient descent).

    Liu et al., "Conflict-Averse Gradient Descent for Multi-task Learning", NeurIPS 2021,
    Algorithm 1. With g0 = (1/T) Σ g_i and φ = c²||g0||², the update d maximises the worst local
    improvement min_i g_iᵀd over the ball ||d − g0|| ≤ c||g0||. Its dual, solved for w, is

        w* = argmin_{w ∈ Δ_T} F(w) = g_wᵀ g0 + √φ ||g_w||,   g_w = Σ w_i g_i,

    and the paper's update is d = g0 + (√φ / ||g_w*||) g_w*, i.e. the returned weights are
    1/T + (√φ/||g_w*||) w*. In Gramian form g_wᵀg0 = wᵀ(G1/T), ||g_w||² = wᵀGw and
    ||g0||² = 1ᵀG1/T².

    `rescale=False` (default) follows the paper's Algorithm 1. The official code (and LibMTL)
    divide the update by (1 + c²) by default (their `rescale=1`); pass `rescale=True` for that.
    TorchJD's CAGrad does not rescale either.

    Inner solver (exact up to root-finding tolerance, not the paper's scipy SLSQP): using
    √x = min_{t>0} (x/t + t)/2, min_w F = min_{t>0} min_w [g_wᵀg0 + (√φ/2)(||g_w||²/t + t)], which
    is jointly convex in (w, t). For fixed t the inner problem is the min-norm point of the shifted
    points g_i + (t/√φ) g0 (an MGDA problem on a modified Gramian), solved exactly by the
    active-set solver; the outer convex 1-D problem's derivative has the sign of t − ||g_w(t)||
    and is solved by a bracketed Illinois (regula falsi) root search on [0, max_i ||g_i||] to a
    relative tolerance `tol` (default 1e-12), so F(w*) is optimal to about that relative
    accuracy; `GramianSolverError` if `max_iter` root-search steps do not suffice. In the tests
    the returned d attains the dual value (an optimality certificate) to ~1e-12 relative. Two
    limits are inherent to working from G in floating point: near Pareto-stationary points,
    where ||g_w*|| ≪ max ||g_i||, the direction g_w*/||g_w*|| (and so d) is only determined to
    about eps·max||g_i||²/||g_w*||²; and with task-gradient norms spread over more than ~1e4 the
    shifted Gramians lose the small tasks to rounding.

    Edge cases: c = 0 or g0 = 0 gives w = 1/T (d = g0). If the optimum has g_w* = 0 (the point is
    Pareto-stationary and the ball contains no strict common-descent direction) the paper's
    update 0/0 is undefined; w = 0 (no step) is returned, as TorchJD does. ||g_w*|| counts as 0 below
    8·√eps·max||g_i|| (≈ 1.2e-7 relative), the rounding floor of a norm read off the Gramian: below it the
    direction of g_w* would be rounding noise.
    """
    if not (c >= 0.0 and math.isfinite(c)):
        raise ValueError(f"cagrad: c must be a finite non-negative number, got {c}")
    G0 = G
    G = _prepare(G, "cagrad")
    T = G.shape[0]
    uniform = torch.full((T,), 1.0 / T, dtype=_F64)
    scale = _mean_diag(G)
    if scale <= 0.0 or c == 0.0:
        return _out(uniform / ((1.0 + c * c) if rescale else 1.0), G0)
    Gs = G / scale
    bvec = Gs.mean(dim=1)                      # g_iᵀ g0
    g0sq = max(float(Gs.mean()), 0.0)          # ||g0||²
    s = c * math.sqrt(g0sq)                    # √φ
    if s <= 1e-15:
        return _out(uniform / ((1.0 + c * c) if rescale else 1.0), G0)
    ones = torch.ones(T, dtype=_F64)

    def inner(t: float) -> tuple[Tensor, float]:
        a = t / s
        Qs = Gs + a * (torch.outer(bvec, ones) + torch.outer(ones, bvec)) + a * a * g0sq
        w = _min_norm_weights(Qs, "cagrad")
        return w, math.sqrt(max(float(w @ Gs @ w), 0.0))

    M = math.sqrt(float(Gs.diagonal().clamp(min=0.0).max()))
    # ||g_w|| is read off wᵀGw, whose rounding error is a few eps·M²: below this it is noise, i.e. 0
    noise = 8.0 * math.sqrt(torch.finfo(_F64).eps) * M
    _, n_lo = inner(0.0)
    lo, f_lo = 0.0, -n_lo
    if n_lo <= noise:
        # 0 is in the convex hull: find t > 0 with t < ||g_w(t)||, if any.
        lo = None
        t = M
        while t > noise:
            t *= 0.5
            _, n_t = inner(t)
            if t - n_t < 0.0:
                lo, f_lo = t, t - n_t
                break
        if lo is None:
            return _out(torch.zeros(T, dtype=_F64), G0)
    hi = M
    w_hi, n_hi = inner(hi)
    f_hi = hi - n_hi
    w_star, n_star = (w_hi, n_hi)
    if f_hi > 0.0:
        side = 0
        for _ in range(max_iter):
            t = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
            if not (lo < t < hi):
                t = 0.5 * (lo + hi)
            w_t, n_t = inner(t)
            f_t = t - n_t
            w_star, n_star = w_t, n_t
            if abs(f_t) <= tol * M or (hi - lo) <= tol * M:
                break
            if f_t > 0.0:
                hi, f_hi = t, f_t
                if side == 1:
                    f_lo *= 0.5
                side = 1
            else:
                lo, f_lo = t, f_t
                if side == -1:
                    f_hi *= 0.5
                side = -1
        else:
            raise GramianSolverError(
                f"cagrad: the inner problem's root search did not reach tolerance {tol} in "
                f"{max_iter} steps")
    if n_star <= noise:
        return _out(torch.zeros(T, dtype=_F64), G0)
    weights = uniform + (s / n_star) * w_star
    if rescale:
        weights = weights / (1.0 + c * c)
    return _out(weights, G0)


# ----------------------------------------------------------------------------------------------
# IMTL-G
# ----------------------------------------------------------------------------------------------

def imtl_g(G: Tensor) -> Tensor:
    r"""IMTL-G weights (impartial multi-task learning, gradient part).

    Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021. The update d = Σ α_t g_t with
    Σ α_t = 1 has equal projections onto every unit task gradient u_t = g_t/||g_t||
    (d·u_1 = d·u_t for all t). With D the rows g_1 − g_t and U the rows u_1 − u_t (t = 2..T),
    the paper's closed form is

        α_{2..T} = g_1 Uᵀ (D Uᵀ)^{-1},   α_1 = 1 − Σ_{t≥2} α_t.

    Gramian form, with n_t = √G_tt and P_ab = g_a·u_b = G_ab / n_b:
    (g_1 Uᵀ)_t = P_11 − P_1t and (D Uᵀ)_st = P_11 − P_1t − P_s1 + P_st.

    Not covered by the paper (documented generalisations): tasks with a zero gradient (u_t
    undefined) get weight 0 and are left out of the system; if D Uᵀ is singular (e.g. two
    identical or linearly dependent gradients) the weights are pinv(G) n / Σ pinv(G) n, the
    generalisation of Quinton & Rey 2024 (TorchJD's IMTL-G), which equals the closed form whenever
    G is invertible; if that sum vanishes, w = 0. The IMTL-L loss-scale part is not included.
    """
    G0 = G
    G = _prepare(G, "imtl_g")
    T = G.shape[0]
    norms = G.diagonal().clamp(min=0.0).sqrt()
    nmax = float(norms.max())
    w = torch.zeros(T, dtype=_F64)
    if nmax <= 0.0:
        return _out(w, G0)
    active = (norms > 1e-12 * nmax).nonzero().squeeze(-1)
    k = active.numel()
    if k == 1:
        w[active] = 1.0
        return _out(w, G0)
    Ga = G[active][:, active]
    n = norms[active]
    P = Ga / n.unsqueeze(0)
    r = P[0, 0] - P[0, 1:]
    DU = P[0, 0] - P[0, 1:].unsqueeze(0) - P[1:, 0].unsqueeze(1) + P[1:, 1:]
    alpha = None
    sv = torch.linalg.svdvals(DU)
    if float(sv.min()) > 1e-10 * float(sv.max()):
        rest = torch.linalg.solve(DU.T, r)
        alpha = torch.cat([(1.0 - rest.sum()).reshape(1), rest])
    else:
        v = torch.linalg.pinv(Ga, rtol=1e-10, hermitian=True) @ n
        total = float(v.sum())
        if abs(total) > 1e-12 * float(v.abs().sum().clamp(min=1e-300)):
            alpha = v / total
        else:
            alpha = torch.zeros(k, dtype=_F64)
    w[active] = alpha
    return _out(w, G0)


# ----------------------------------------------------------------------------------------------
# Nash-MTL
# ----------------------------------------------------------------------------------------------

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
    G = _prepare(G, "nash_mtl")
    T = G.shape[0]
    out = torch.zeros(T, dtype=_F64)
    norms = G.diagonal().clamp(min=0.0).sqrt()
    nmax = float(norms.max())
    if nmax <= 0.0:
        return _out(out, G0)
    active = (norms > 1e-12 * nmax).nonzero().squeeze(-1)
    k = active.numel()
    n = norms[active]
    H0 = G[active][:, active] / torch.outer(n, n)
    rho = max(ridge, 8.0 * k * _eps(G0)) if ridge > 0.0 else 0.0
    H0 = 0.5 * (H0 + H0.T) + rho * torch.eye(k, dtype=_F64)
    absH = H0.abs()
    # start on the ray of 1 at its best scale (capped: 1ᵀĜ1 ≈ 0 when the mean direction vanishes)
    beta = torch.ones(k, dtype=_F64) * math.sqrt(k / max(float(H0.sum()), 1e-6 * k))

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
        step = -sol if int(info) == 0 and bool(torch.isfinite(sol).all()) else -_solve_sym(hess, grad)
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
    return _out(out, G0)


# ----------------------------------------------------------------------------------------------
# UPGrad
# ----------------------------------------------------------------------------------------------

def upgrad(G: Tensor, pref: Optional[Tensor] = None, *, ridge: float = 1e-12,
           tol: float = 1e-13) -> Tensor:
    r"""UPGrad weights (unconflicting projection of gradients; TorchJD's default aggregator).

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024: each row g_i is
    projected onto the dual cone C = {x : Jx ≥ 0} (the directions that conflict with no task) and
    the projections are averaged: d = Σ_i p_i π_C(g_i) with p = 1/T (or `pref`).

    Gramian form (the paper's Proposition 1): for u ∈ R^T, π_C(Jᵀu) = Jᵀv with

        v = argmin_{v ≥ u} vᵀ G v,

    i.e. v = u + λ, λ = argmin_{λ ≥ 0} ½(u + λ)ᵀG(u + λ): a non-negative least-squares problem in
    Gram form (Q = G, c = −Gu), solved by a Lawson–Hanson active-set method (finite termination;
    exact up to rounding, dual residual ≤ `tol` relative). With u = p_i e_i for each i,
    w = Σ_i v_i, and d = Jᵀw satisfies d·g_j = (Gw)_j ≥ 0 for every task.

    Conditioning and regularisation: the dual cone does not change when a task gradient is
    rescaled, so the QP is solved in correlation form (Ĝ = N⁻¹GN⁻¹, N = diag ||g_i||, variables
    v̂ = Nv) with a ridge ρI added to Ĝ, ρ = max(`ridge`, 8·T·eps(G.dtype)): 1e-12 for float64
    input, ~1e-6·T for float32 input (whose rounding already perturbs G that much). With the
    ridge the result is the exact UPGrad of the augmented rows [g_i, √ρ ||g_i|| e_i]; it keeps
    the weights bounded when G is (nearly) singular, e.g. nearly opposite gradients, where the
    exact weights blow up and a Gram-form solve loses all accuracy. Cost: d·g_j ≥ −ρ ||g_j||² v_j
    per projection (about ρ relative in well-conditioned cases; ≤ ~1e-7 relative for float64 G
    even with gradients opposite to 1e-6) and an O(ρ) change of d. `ridge=0` gives the exact
    projection (fine for well-conditioned float64 G). TorchJD does the same with ρ = 1e-4 relative
    to the trace before calling quadprog, so its result differs from the exact one by O(1e-4).
    Zero-gradient tasks constrain nothing; they keep weight p_i (which does not affect d). If G is
    singular and ρ = 0, w is not unique (d is); one solution is returned.
    """
    if not (ridge >= 0.0):
        raise ValueError(f"upgrad: ridge must be >= 0, got {ridge}")
    G0 = G
    G = _prepare(G, "upgrad")
    T = G.shape[0]
    p = _pref(pref, T, "upgrad")
    scale = _mean_diag(G)
    if scale <= 0.0:
        return _out(p.clone(), G0)
    rho = max(ridge, 8.0 * T * _eps(G0)) if ridge > 0.0 else 0.0
    norms = G.diagonal().clamp(min=0.0).sqrt()
    active = (norms > 1e-12 * float(norms.max())).nonzero().squeeze(-1)
    n = norms[active]
    k = active.numel()
    C = G[active][:, active] / torch.outer(n, n)
    C = 0.5 * (C + C.T) + rho * torch.eye(k, dtype=_F64)
    cmax = float(C.diagonal().max())
    # zero-gradient tasks: nothing to project, their weight does not affect d
    w = p.clone()
    w[active] = 0.0
    for a in range(k):
        pi = float(p[active[a]])
        if pi == 0.0:
            continue
        u = torch.zeros(k, dtype=_F64)
        u[a] = pi * float(n[a])                      # v̂ = N v ≥ N u
        lam = _nnls_gram(C, -(C @ u), tol=tol * cmax * abs(float(u[a])),
                         max_iter=50 * k + 50, name="upgrad")
        w[active] += (u + lam) / n
    return _out(w, G0)


# ----------------------------------------------------------------------------------------------
# Aligned-MTL
# ----------------------------------------------------------------------------------------------

def aligned_mtl(G: Tensor, pref: Optional[Tensor] = None, *, rtol: Optional[float] = None) -> Tensor:
    r"""Aligned-MTL weights (independent component alignment).

    Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR 2023,
    Algorithm 1. With the eigendecomposition G = V Λ Vᵀ (Λ = Σ², Σ the singular values of the
    gradient matrix) the balance transformation is B = σ_min V Σ^{-1} Vᵀ, σ_min = √λ_min; the
    aligned gradients Jᵀ B have all singular values equal to σ_min (condition number 1), and the
    update is d = Jᵀ B p, so w = B p with pre-weights p = 1/T (or `pref`).

    Rank deficiency (as in the official code): eigenvalues ≤ rtol·λ_max are dropped, with
    rtol = T·eps(G.dtype) by default (eps of the *input* dtype, so float32 rounding noise in G is
    not mistaken for a direction); V, Σ, σ_min then refer to the kept eigenpairs, so Jᵀ B has
    rank r and its r non-zero singular values all equal σ_min. If nothing is kept (G ≈ 0), B = I.

    Pre-weights: the official code (SamsungLabs/MTL, also LibMTL) sums the aligned gradients,
    i.e. p = 1 (T times the default here); TorchJD uses p = 1/T. Pass ``pref=torch.ones(T)`` to
    match the official scale. Only the paper's 'min' scale mode is implemented.
    """
    G0 = G
    G = _prepare(G, "aligned_mtl")
    T = G.shape[0]
    p = _pref(pref, T, "aligned_mtl")
    lam, V = torch.linalg.eigh(G)
    lmax = float(lam.max())
    if rtol is None:
        rtol = T * _eps(G0)
    keep = lam > rtol * lmax if lmax > 0.0 else torch.zeros(T, dtype=torch.bool)
    if not bool(keep.any()):
        return _out(p.clone(), G0)
    lam_k, V_k = lam[keep], V[:, keep]
    sigma = lam_k.sqrt()
    B = float(sigma.min()) * (V_k / sigma.unsqueeze(0)) @ V_k.T
    return _out(B @ p, G0)


# ----------------------------------------------------------------------------------------------
# GradVac
# ----------------------------------------------------------------------------------------------

def gradvac(G: Tensor, ema: Optional[Tensor] = None, beta: float = 0.01,
            generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    r"""GradVac weights (Gradient Vaccine) and the updated EMA of target similarities.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1. For each task i, g_i' ← g_i; for each
    other task j in random order: φ_ij = cos(g_i', g_j); if φ_ij < φ̂_ij,

        g_i' ← g_i' + ||g_i'|| (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (||g_j|| √(1−φ̂_ij²)) · g_j,

    which makes cos(g_i', g_j) exactly φ̂_ij; then (always, as in the paper's algorithm)
    φ̂_ij ← (1−β) φ̂_ij + β φ_ij with the φ_ij measured before the correction. d = Σ_i g_i'.
    With φ̂ = 0 the correction is exactly PCGrad's projection.

    Gramian form: g_i' = Σ_k C_ik g_k, ||g_i'||² = C_i G C_iᵀ, g_i'·g_j = (C_i G)_j; a correction
    adds a to C_ij; w = Σ_i C_i.

    State: `ema` is the (T, T) matrix φ̂ (diagonal unused; None means zeros, the paper's
    initialisation); the function does not modify it and returns (w, new_ema), new_ema with
    ema's dtype/device (G's if ema is None). Randomness: for each i a permutation of the other
    tasks is drawn with ``torch.randperm(T − 1, generator=generator)`` (TorchJD's draw order).

    Notes: the paper applies GradVac per layer/parameter group; on a Gramian this is the
    whole-model variant (call it once per group's Gramian for the layer-wise one). β = 0.01 is
    this package's default; LibMTL and TorchJD default to 0.5. LibMTL updates the EMA only when a
    correction happens; the paper (and this function, and TorchJD) update it for every pair. Pairs
    where g_i' or g_j is zero (cosine undefined) are skipped and their EMA entry kept. A target
    with |φ̂| ≥ 1 is clamped to ±(1 − 1e-12) in the correction (the exact one is unbounded).
    """
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
    G0 = G
    G = _prepare(G, "gradvac")
    T = G.shape[0]
    if ema is None:
        phi_hat = torch.zeros(T, T, dtype=_F64)
        ema_dtype, ema_device = G0.dtype, G0.device
    else:
        if tuple(ema.shape) != (T, T):
            raise ValueError(f"gradvac: ema must have shape ({T}, {T}), got {tuple(ema.shape)}")
        phi_hat = ema.detach().to(device=_CPU, dtype=_F64).clone()
        if not bool(torch.isfinite(phi_hat).all()):
            raise ValueError("gradvac: ema has NaN or infinite entries")
        ema_dtype, ema_device = ema.dtype, ema.device
    norms = G.diagonal().clamp(min=0.0).sqrt()
    C = torch.eye(T, dtype=_F64)
    lim = 1.0 - 1e-12
    for i in range(T):
        others = [j for j in range(T) if j != i]
        order = [others[k] for k in torch.randperm(T - 1, generator=generator).tolist()]
        cG = G[i].clone()
        for j in order:
            ni = math.sqrt(max(float(cG @ C[i]), 0.0))
            nj = float(norms[j])
            if ni <= 0.0 or nj <= 0.0:
                continue
            phi = min(max(float(cG[j]) / (ni * nj), -1.0), 1.0)
            target = float(phi_hat[i, j])
            if phi < target:
                tgt = min(max(target, -lim), lim)
                s_t = math.sqrt(1.0 - tgt * tgt)
                a = ni * (tgt * math.sqrt(1.0 - phi * phi) - phi * s_t) / (nj * s_t)
                C[i, j] += a
                cG += a * G[j]
            phi_hat[i, j] = (1.0 - beta) * target + beta * phi
    return _out(C.sum(dim=0), G0), phi_hat.to(device=ema_device, dtype=ema_dtype)
