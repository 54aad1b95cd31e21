"""DualProj (Quinton & Rey, 2024): its Gramian solver and its registration."""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..dual_cone import dual_cone_weights
from ..solvers import as_output, preference, prepare


def dualproj(G: Tensor, pref: Optional[Tensor] = None, *, ridge: float = 1e-12,
             tol: float = 1e-13) -> Tensor:
    r"""DualProj weights: the mean gradient projected onto the dual cone of the task gradients.

    Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024 (TorchJD's `DualProj`;
    the projection of Lopez-Paz & Ranzato's GEM, Eq. 11, applied to the average): with
    C = {x : Jx ≥ 0} the directions that conflict with no task and p = 1/T (or `pref`),

        d = π_C(Jᵀp) = argmin_{x ∈ C} ||x − Σ_i p_i g_i||².

    Where UPGrad averages the projections of the individual gradients, d = Σ_i p_i π_C(g_i), DualProj
    projects their average once: the two coincide when the mean is already in C (then d is the mean)
    and differ otherwise. Gramian form (the paper's Proposition 1): d = Jᵀw with
    w = argmin_{w ≥ p} wᵀGw, so w ≥ p and d·g_j = (Gw)_j ≥ 0 for every task.

    Solver: `dual_cone.dual_cone_weights` (the one UPGrad uses, with u = p): NNLS in correlation form
    with a ridge ρ = max(`ridge`, 8·T·eps(G.dtype)) on the correlation matrix (`ridge=0`: the exact
    projection); zero-gradient tasks keep w_i = p_i. TorchJD instead normalises G by its trace
    (`norm_eps` = 1e-4: G = 0 below that) and adds `reg_eps`·I = 1e-4·I to it before calling quadprog,
    which moves d by O(1e-4) relative; with `reg_eps=0` (and any `norm_eps` below trace(G)) it solves
    the same exact QP as `ridge=0` here. The cone does not depend on the gradients' norms but the
    projected mean does, so no scaling property holds.
    """
    T = prepare(G, "dualproj").shape[0]
    p = preference(pref, T, "dualproj")
    V = dual_cone_weights(G, p.unsqueeze(0), "dualproj", ridge=ridge, tol=tol)
    return as_output(V[0], G)


@METHODS.register("dualproj", params=GradientParams,
                  description="DualProj: the mean gradient projected onto the dual cone of the task "
                              "gradients (Quinton & Rey, 2024: Jacobian descent).")
class DualProj(GramianWeighting):
    """DualProj weights (`dualproj`) on the step's Gramian."""

    promises = Promises(non_conflicting=True)
    solver = staticmethod(dualproj)
