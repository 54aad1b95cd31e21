"""Aligned-MTL (Senushkin et al., CVPR 2023): its Gramian solver and its registration."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import METHODS
from ..gradient import GradientParams, GramianWeighting
from ..solvers import as_output, input_eps, preference, prepare


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
    G = prepare(G, "aligned_mtl")
    T = G.shape[0]
    p = preference(pref, T, "aligned_mtl")
    lam, V = torch.linalg.eigh(G)
    lmax = float(lam.max())
    if rtol is None:
        rtol = T * input_eps(G0)
    keep = lam > rtol * lmax if lmax > 0.0 else torch.zeros(T, dtype=torch.bool)
    if not bool(keep.any()):
        return as_output(p.clone(), G0)
    lam_k, V_k = lam[keep], V[:, keep]
    sigma = lam_k.sqrt()
    B = float(sigma.min()) * (V_k / sigma.unsqueeze(0)) @ V_k.T
    return as_output(B @ p, G0)


@METHODS.register("aligned_mtl", params=GradientParams,
                  description="Aligned-MTL: align the gradient system to condition number 1 "
                              "(Senushkin et al., CVPR 2023).")
class AlignedMTL(GramianWeighting):
    """Aligned-MTL weights (`aligned_mtl`) on the step's Gramian."""

    solver = staticmethod(aligned_mtl)
