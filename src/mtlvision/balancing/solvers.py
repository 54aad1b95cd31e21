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
min-norm point of the convex hull, by NNLS), `solve_sym` (minimum-norm least squares).
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
