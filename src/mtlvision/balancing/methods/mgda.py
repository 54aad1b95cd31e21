"""MGDA (Sener & Koltun, NeurIPS 2018): its Gramian solver and its registration."""
from __future__ import annotations


import torch
from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..solvers import F64, as_output, mean_diag, min_norm_weights, prepare


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
    an exact active-set NNLS solve of the lifted problem (see `solvers.min_norm_weights`), if
    that has the lower objective (it always does up to rounding; when the exact solution's duality gap
    proves it, FW is not run at all, which returns the same weights). `exact=False` returns the
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
    if exact:
        # The exact minimiser replaces the Frank–Wolfe iterate whenever its objective is not higher (by
        # 1e-12·mean diag). Its duality gap bounds how far it is from the optimum, which no feasible FW
        # iterate can beat: a gap below half that margin settles the comparison without running FW.
        w_exact = min_norm_weights(G, "mgda")
        Gw = G @ w_exact
        ex_obj = float(w_exact @ Gw)
        margin = 1e-12 * max(mean_diag(G), 1e-300)
        if 2.0 * (ex_obj - float(Gw.min())) <= 0.5 * margin:
            return as_output(w_exact, G0)
    w = _frank_wolfe(G, max_iter, tol)
    if exact:
        fw_obj = float(w @ G @ w)
        if ex_obj <= fw_obj + margin:
            w = w_exact
    return as_output(w, G0)


def _frank_wolfe(G: Tensor, max_iter: int, tol: float) -> Tensor:
    """The paper's Algorithm 2 from w = 1/T (see `mgda`)."""
    T = G.shape[0]
    # Plain Python floats: T is small and the loop is sequential (much faster than tensor ops).
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
    return torch.tensor(wl, dtype=F64)


@METHODS.register("mgda", params=GradientParams,
                  description="MGDA: min-norm point of the task gradients' convex hull, Frank-Wolfe "
                              "(Sener & Koltun, NeurIPS 2018); feature space = MGDA-UB.")
class MGDA(GramianWeighting):
    """MGDA weights (`mgda`) on the step's Gramian; in feature space this is MGDA-UB."""

    # a task with no labelled row in the batch (loss 0) would put 0 in the convex hull and stop the step:
    # it is left out (weight 0), not part of the paper (IMTL-G and Nash-MTL do the same for zero gradients)
    skip_absent = True
    promises = Promises(non_conflicting=True)
    solver = staticmethod(mgda)
