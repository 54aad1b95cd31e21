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

Helpers: `nnls_gram` / `nnls_gram_many` (exact NNLS in Gram form, one or many right-hand sides:
batched primal-dual active-set steps, finished by Lawson–Hanson where they have not converged),
`min_norm_weights` (the exact min-norm point of the convex hull, by NNLS), `correlation` (the tasks with a
gradient and their correlation matrix), `solve_sym` (minimum-norm least squares); `dual_cone.py` (projections
onto the dual cone: UPGrad, DualProj) and `alpha_fair.py` (the α-fair allocation: FairGrad, Nash-MTL) build
on them. Many tasks (T = 50): the solvers avoid Python loops over T² pairs and T separate
iterative solves; `benchmarks/gramian_solvers.py` reports the time per solve.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
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


def _lstsq(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`solve_sym` on numpy arrays (torch's LAPACK: the same bits as `solve_sym` on the same matrix)."""
    return solve_sym(torch.from_numpy(np.ascontiguousarray(A)), torch.from_numpy(np.ascontiguousarray(b))).numpy()


def _lawson_hanson(Q: np.ndarray, c: np.ndarray, tol: float, max_iter: int, name: str) -> np.ndarray:
    """Lawson–Hanson active-set NNLS in Gram form (finite termination), in numpy float64."""
    T = c.shape[0]
    x = np.zeros(T)
    passive = np.zeros(T, dtype=bool)
    blocked = np.zeros(T, dtype=bool)  # degenerate candidates, retried after x changes
    w = c.copy()
    iters = 0
    while True:
        cand = ~passive & ~blocked & (w > tol)
        if not cand.any():
            break
        j = int(np.argmax(np.where(cand, w, -np.inf)))
        passive[j] = True
        first = True
        while True:
            iters += 1
            if iters > max_iter:
                raise GramianSolverError(
                    f"{name}: active-set (Lawson–Hanson) solver did not terminate in {max_iter} "
                    "iterations; the Gramian is probably badly conditioned")
            idx = np.flatnonzero(passive)
            z = np.zeros(T)
            z[idx] = _lstsq(Q[np.ix_(idx, idx)], c[idx])
            if first and z[j] <= 0.0:
                # The column just added cannot enter (numerically dependent on the passive set):
                # leave x unchanged and exclude j until x changes (the classic LH safeguard).
                passive[j] = False
                blocked[j] = True
                break
            first = False
            bad = passive & (z <= 0.0)
            if not bad.any():
                x = z
                blocked[:] = False
                break
            ratios = x[bad] / (x[bad] - z[bad])
            alpha = float(ratios.min())
            x = x + alpha * (z - x)
            drop = np.zeros(T, dtype=bool)
            drop[np.flatnonzero(bad)[ratios <= alpha]] = True
            drop |= passive & (x <= 0.0)
            x[drop] = 0.0
            passive &= ~drop
            blocked[:] = False
        w = c - Q @ x
    return x


def _primal_dual(Q: np.ndarray, C: np.ndarray, tol: np.ndarray, free: np.ndarray, steps: int,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Primal-dual active-set iterations (Hintermüller, Ito & Kunisch 2002) for K problems at once:
    argmin_{x >= 0} ½ xᵀQx − c_kᵀx for the rows c_k of C, from the guessed supports `free` (K, T).

    Each step solves every problem on its current support (one batched solve) and moves to the support
    the KKT conditions point at: {x_j > 0} ∪ {j off the support with dual residual (c − Qx)_j > tol}.
    A problem is solved when its solution is strictly positive on its support, its dual residual is at
    most `tol` off it and its support equations hold: the same optimality test Lawson–Hanson stops on.
    Returns (X, solved (K,), last supports). The method usually needs a handful of steps but is not
    guaranteed to terminate: unsolved problems are left to `_lawson_hanson` by the caller."""
    K, T = C.shape
    X = np.zeros((K, T))
    solved = np.zeros(K, dtype=bool)
    free = free.copy()
    eye = np.eye(T, dtype=bool)
    absQ = np.abs(Q)
    for _ in range(steps):
        todo = np.flatnonzero(~solved)
        if todo.size == 0:
            break
        F = free[todo]
        M = np.where(F[:, :, None] & F[:, None, :], Q, 0.0) + (eye & ~F[:, :, None]).astype(float)
        try:
            Z = np.linalg.solve(M, np.where(F, C[todo], 0.0)[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular support (possible without a ridge)
            break
        if not np.isfinite(Z).all():
            break
        W = C[todo] - Z @ Q
        t = tol[todo, None]
        scale = np.abs(C[todo]) + np.abs(Z) @ absQ
        ok = (np.where(F, Z > 0.0, W <= t).all(1)
              & np.where(F, np.abs(W) <= 1e-9 * scale.max(1, keepdims=True), True).all(1))
        X[todo[ok]] = Z[ok]
        solved[todo[ok]] = True
        free[todo] = np.where(F, Z > 0.0, W > t)
    return X, solved, free


def _ill_conditioned(Q: np.ndarray, X: np.ndarray, solved: np.ndarray, limit: float = 2e3) -> np.ndarray:
    """The solved problems whose support matrix Q_FF has a 1-norm condition number above `limit`."""
    todo = np.flatnonzero(solved)
    if todo.size == 0:
        return todo
    F = X[todo] > 0.0
    T = Q.shape[0]
    M = np.where(F[:, :, None] & F[:, None, :], Q, 0.0) + (np.eye(T, dtype=bool) & ~F[:, :, None]).astype(float)
    try:
        inv = np.linalg.inv(M)
    except np.linalg.LinAlgError:
        return todo
    cond = np.abs(M).sum(1).max(1) * np.abs(inv).sum(1).max(1)
    return todo[~(cond <= limit)]


def nnls_gram_many(Q: Tensor, C: Tensor, tol: Tensor | float, max_iter: int, name: str,
                   free: Optional[Tensor] = None, polish: bool = False) -> Tensor:
    """`nnls_gram` for K right-hand sides at once: row k of the result is argmin_{x >= 0} ½ xᵀQx − c_kᵀx
    for row c_k of C (K, T), with dual tolerance tol[k] (or one `tol` for all).

    Solved by batched primal-dual active-set steps from the supports `free` (K, T) (default: {c_k > tol_k},
    the variables whose gradient points inward at 0); any problem they have not solved in T + 10 steps
    is solved by Lawson–Hanson (`max_iter` iterations, then `GramianSolverError`). Both stop only on
    the same optimality test, so the result is the exact minimiser (unique when Q is positive
    definite). Where the support's matrix is ill-conditioned (1-norm condition above 2e3), or for every
    problem with `polish`, the solution is recomputed on its support by the least-squares solve
    Lawson–Hanson ends on: the two then return the same x, bit for bit, wherever they find the same
    support (elsewhere they agree to ~cond·eps)."""
    Qn = Q.detach().to(device=CPU, dtype=F64).numpy()
    Cn = C.detach().to(device=CPU, dtype=F64).numpy().reshape(-1, Qn.shape[0])
    K, T = Cn.shape
    tols = np.broadcast_to(np.asarray(tol.detach().cpu().double().numpy() if isinstance(tol, Tensor) else tol,
                                      dtype=np.float64), (K,)).copy()
    if free is None:
        guess = Cn > tols[:, None]
    else:
        guess = free.detach().cpu().numpy().astype(bool).reshape(K, T)
    X, solved, _ = _primal_dual(Qn, Cn, tols, guess, T + 10)
    for k in (np.flatnonzero(solved) if polish else _ill_conditioned(Qn, X, solved)):
        # the support's equations once more by the solve Lawson–Hanson ends on (SVD least squares):
        # where both find the same support, they return the same x, bit for bit (needed only where the
        # support's matrix is ill-conditioned: elsewhere the two solves agree to ~cond·eps < 1e-12)
        idx = np.flatnonzero(X[k] > 0.0)
        if idx.size:
            z = _lstsq(Qn[np.ix_(idx, idx)], Cn[k, idx])
            if (z > 0.0).all():
                X[k] = 0.0
                X[k, idx] = z
            else:  # rounding moved the support's boundary: let Lawson–Hanson decide
                solved[k] = False
    for k in np.flatnonzero(~solved):
        X[k] = _lawson_hanson(Qn, Cn[k], float(tols[k]), max_iter, name)
    return torch.from_numpy(X)


def nnls_gram(Q: Tensor, c: Tensor, tol: float, max_iter: int, name: str,
              free: Optional[Tensor] = None) -> Tensor:
    """Exact NNLS in Gram form: argmin_{x >= 0} ½ xᵀQx − cᵀx (Q PSD).

    For a least-squares problem min ||A x − b||² one passes Q = AᵀA and c = Aᵀb; only these are
    needed, so the solver works from a Gramian. At exit x > 0 on its support, the support equations
    hold, and `tol` bounds the dual residual max_j (c − Qx)_j off the support. Primal-dual active-set
    steps from the support guess `free` (T,) bool (a warm start, e.g. the previous solve's support;
    default {c > tol}), then, if they have not converged, Lawson–Hanson (finite termination; more than
    `max_iter` iterations raise `GramianSolverError`): see `nnls_gram_many` (here with `polish`: the
    same x as Lawson–Hanson's wherever both find the same support)."""
    return nnls_gram_many(Q, c.reshape(1, -1), tol, max_iter, name,
                          None if free is None else free.reshape(1, -1), polish=True)[0]


def min_norm_solve(Q: Tensor, name: str, free: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """`min_norm_weights`, and the support of its lifted NNLS solution: a warm start (`free`) for the next
    solve on a nearby Q (CAGrad's root search)."""
    T = Q.shape[0]
    s = mean_diag(Q)
    if s <= 0.0:
        return torch.full((T,), 1.0 / T, dtype=F64), torch.ones(T, dtype=torch.bool)
    Qn = Q / s + torch.ones(T, T, dtype=F64)
    x = nnls_gram(Qn, torch.ones(T, dtype=F64), tol=1e-13, max_iter=50 * T + 50, name=name, free=free)
    total = float(x.sum())
    if not total > 0.0:
        raise GramianSolverError(f"{name}: min-norm solver returned a zero vector")
    return x / total, x > 0.0


def min_norm_weights(Q: Tensor, name: str) -> Tensor:
    """Exact minimiser of wᵀQw over the simplex (the min-norm point of the convex hull).

    Lifting each g_i to (g_i, 1), the projection of (0, 1) onto the cone they generate is
    x* = argmin_{x >= 0} ||Σ x_i g_i||² + (Σ x_i − 1)², and w* = x*/Σx* (Lawson & Hanson's LDP
    reduction). In Gram form that is NNLS with Q + 11ᵀ and c = 1, solved by `nnls_gram`.
    Q is normalised by its mean diagonal first (the minimiser is scale-invariant).
    """
    return min_norm_solve(Q, name)[0]
