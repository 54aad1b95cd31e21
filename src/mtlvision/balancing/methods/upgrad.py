"""UPGrad (Quinton & Rey, 2024): its Gramian solver and its registration."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..dual_cone import dual_cone_weights
from ..solvers import as_output, preference, prepare


def upgrad(G: Tensor, pref: Optional[Tensor] = None, *, ridge: float = 1e-12,
           tol: float = 1e-13) -> Tensor:
    r"""UPGrad weights (unconflicting projection of gradients; TorchJD's default aggregator).

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024: each row g_i is
    projected onto the dual cone C = {x : Jx ≥ 0} (the directions that conflict with no task) and
    the projections are averaged: d = Σ_i p_i π_C(g_i) with p = 1/T (or `pref`).

    Gramian form (the paper's Proposition 1): for u ∈ R^T, π_C(Jᵀu) = Jᵀv with

        v = argmin_{v ≥ u} vᵀ G v,

    i.e. v = u + λ, λ = argmin_{λ ≥ 0} ½(u + λ)ᵀG(u + λ): a non-negative least-squares problem in
    Gram form (Q = G, c = −Gu), solved exactly (dual residual ≤ `tol` relative) for every task at once:
    `dual_cone.dual_cone_weights` (shared with DualProj) calls `solvers.nnls_gram_many` (batched
    primal-dual active-set steps, Lawson–Hanson where they do not converge). With u = p_i e_i for each i, w = Σ_i v_i, and d = Jᵀw satisfies d·g_j = (Gw)_j ≥ 0
    for every task.

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
    T = prepare(G, "upgrad").shape[0]
    p = preference(pref, T, "upgrad")
    V = dual_cone_weights(G, torch.diag(p), "upgrad", ridge=ridge, tol=tol)
    return as_output(V.sum(dim=0), G)


@METHODS.register("upgrad", params=GradientParams,
                  description="UPGrad: mean of the projections onto the dual cone "
                              "(Quinton & Rey, 2024: Jacobian descent).")
class UPGrad(GramianWeighting):
    """UPGrad weights (`upgrad`) on the step's Gramian."""

    promises = Promises(non_conflicting=True)
    solver = staticmethod(upgrad)
