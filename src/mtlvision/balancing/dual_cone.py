"""Projections onto the dual cone of the task gradients, by NNLS in Gram form (UPGrad, DualProj)."""
from __future__ import annotations

import torch
from torch import Tensor

from .solvers import CPU, F64, correlation, input_eps, mean_diag, nnls_gram_many, prepare


def dual_cone_weights(G: Tensor, U: Tensor, name: str, *, ridge: float = 1e-12,
                      tol: float = 1e-13) -> Tensor:
    r"""Weights of the projections of Jᵀu onto the dual cone C = {x : Jx ≥ 0}, for each row u of U (K, T).

    Quinton & Rey 2024, Proposition 1: π_C(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv = u + λ,
    λ = argmin_{λ ≥ 0} ½(u + λ)ᵀG(u + λ): NNLS in Gram form (Q = G, c = −Gu), every u at once by `nnls_gram_many`. Returns V
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
    Ua = U[:, active] * n                             # v̂ = N v ≥ N u, one row per u
    umax = Ua.abs().max(dim=1).values
    rows = (umax > 0).nonzero().squeeze(-1)
    if rows.numel():  # every projection shares Q = C: solved together
        lam = nnls_gram_many(C, -(Ua[rows] @ C), tol * cmax * umax[rows], max_iter=50 * k + 50, name=name)
        V[rows.unsqueeze(1), active.unsqueeze(0)] = (Ua[rows] + lam) / n
    return V
