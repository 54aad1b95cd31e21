"""The Gramian solvers as they were before they were made fast for many tasks (commit 0773c46), kept verbatim
as the reference the fast ones must reproduce (tests/test_gramian_speed.py). Not used by the library."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from mtlvision.balancing.solvers import (CPU, F64, GramianSolverError, as_output, input_eps, mean_diag, preference,
                                         prepare)


def solve_sym(A: Tensor, b: Tensor) -> Tensor:
    """Minimum-norm least-squares solution of A x = b for a small symmetric A (SVD based)."""
    return torch.linalg.lstsq(A, b.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)


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
    G = prepare(G, "pcgrad")
    T = G.shape[0]
    C = torch.eye(T, dtype=F64)
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
    return as_output(C.sum(dim=0), G0)


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
    G = prepare(G, "gradvac")
    T = G.shape[0]
    if ema is None:
        phi_hat = torch.zeros(T, T, dtype=F64)
        ema_dtype, ema_device = G0.dtype, G0.device
    else:
        if tuple(ema.shape) != (T, T):
            raise ValueError(f"gradvac: ema must have shape ({T}, {T}), got {tuple(ema.shape)}")
        phi_hat = ema.detach().to(device=CPU, dtype=F64).clone()
        if not bool(torch.isfinite(phi_hat).all()):
            raise ValueError("gradvac: ema has NaN or infinite entries")
        ema_dtype, ema_device = ema.dtype, ema.device
    norms = G.diagonal().clamp(min=0.0).sqrt()
    C = torch.eye(T, dtype=F64)
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
    return as_output(C.sum(dim=0), G0), phi_hat.to(device=ema_device, dtype=ema_dtype)


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
    G = prepare(G, "upgrad")
    T = G.shape[0]
    p = preference(pref, T, "upgrad")
    scale = mean_diag(G)
    if scale <= 0.0:
        return as_output(p.clone(), G0)
    rho = max(ridge, 8.0 * T * input_eps(G0)) if ridge > 0.0 else 0.0
    norms = G.diagonal().clamp(min=0.0).sqrt()
    active = (norms > 1e-12 * float(norms.max())).nonzero().squeeze(-1)
    n = norms[active]
    k = active.numel()
    C = G[active][:, active] / torch.outer(n, n)
    C = 0.5 * (C + C.T) + rho * torch.eye(k, dtype=F64)
    cmax = float(C.diagonal().max())
    # zero-gradient tasks: nothing to project, their weight does not affect d
    w = p.clone()
    w[active] = 0.0
    for a in range(k):
        pi = float(p[active[a]])
        if pi == 0.0:
            continue
        u = torch.zeros(k, dtype=F64)
        u[a] = pi * float(n[a])                      # v̂ = N v ≥ N u
        lam = nnls_gram(C, -(C @ u), tol=tol * cmax * abs(float(u[a])),
                         max_iter=50 * k + 50, name="upgrad")
        w[active] += (u + lam) / n
    return as_output(w, G0)


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
    an active-set solve (Lawson–Hanson NNLS on the lifted problem, see `solvers.min_norm_weights`), if
    that has the lower objective (it always does up to rounding). `exact=False` returns the
    paper's FW iterate unchanged (this is what TorchJD's `MGDAWeighting(epsilon=tol,
    max_iters=max_iter)` computes). The official code's optional gradient normalisation
    ('l2', 'loss', 'loss+') is not applied: normalise G beforehand if wanted. Returns w ≥ 0,
    Σw = 1. If G = 0 (all gradients zero) returns 1/T.
    """
    G0 = G
    G = prepare(G, "mgda")
    T = G.shape[0]
    if T == 1:
        return as_output(torch.ones(1, dtype=F64), G0)
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
    w = torch.tensor(wl, dtype=F64)
    if exact:
        w_exact = min_norm_weights(G, "mgda")
        fw_obj = float(w @ G @ w)
        ex_obj = float(w_exact @ G @ w_exact)
        if ex_obj <= fw_obj + 1e-12 * max(mean_diag(G), 1e-300):
            w = w_exact
    return as_output(w, G0)


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
    G = prepare(G, "cagrad")
    T = G.shape[0]
    uniform = torch.full((T,), 1.0 / T, dtype=F64)
    scale = mean_diag(G)
    if scale <= 0.0 or c == 0.0:
        return as_output(uniform / ((1.0 + c * c) if rescale else 1.0), G0)
    Gs = G / scale
    bvec = Gs.mean(dim=1)                      # g_iᵀ g0
    g0sq = max(float(Gs.mean()), 0.0)          # ||g0||²
    s = c * math.sqrt(g0sq)                    # √φ
    if s <= 1e-15:
        return as_output(uniform / ((1.0 + c * c) if rescale else 1.0), G0)
    ones = torch.ones(T, dtype=F64)

    def inner(t: float) -> tuple[Tensor, float]:
        a = t / s
        Qs = Gs + a * (torch.outer(bvec, ones) + torch.outer(ones, bvec)) + a * a * g0sq
        w = min_norm_weights(Qs, "cagrad")
        return w, math.sqrt(max(float(w @ Gs @ w), 0.0))

    M = math.sqrt(float(Gs.diagonal().clamp(min=0.0).max()))
    # ||g_w|| is read off wᵀGw, whose rounding error is a few eps·M²: below this it is noise, i.e. 0
    noise = 8.0 * math.sqrt(torch.finfo(F64).eps) * M
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
            return as_output(torch.zeros(T, dtype=F64), G0)
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
        return as_output(torch.zeros(T, dtype=F64), G0)
    weights = uniform + (s / n_star) * w_star
    if rescale:
        weights = weights / (1.0 + c * c)
    return as_output(weights, G0)
