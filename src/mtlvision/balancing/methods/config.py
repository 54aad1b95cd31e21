"""ConFIG (Liu, Chu & Thuerey, ICLR 2025): its Gramian solver and its registration."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..solvers import F64, as_output, correlation, input_eps, preference, prepare


def config(G: Tensor, pref: Optional[Tensor] = None, *, rtol: Optional[float] = None) -> Tensor:
    r"""ConFIG weights (conflict-free inverse gradients).

    Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025, Eq. 2: with the unit gradients U = [ĝ_1, ..., ĝ_T]ᵀ (ĝ_i = g_i/||g_i||) and weights p
    (1 for every task, the official `EqualWeight`; `pref` otherwise),

        g_u = U⁺ p,   ĝ_u = g_u/||g_u||,   d = (Σ_i g_iᵀĝ_u) ĝ_u,

    so when the gradients are linearly independent, ĝ_iᵀg_u = p_i: d has the same cosine with every
    task gradient (for p = 1) and conflicts with none; its length is the sum of the gradients'
    projections on it (the official `ProjectionLength`).

    A function of G alone: U⁺ = Uᵀ(UUᵀ)⁺ and UUᵀ = C = N⁻¹GN⁻¹ (N = diag ||g_i||, the normalised
    Gramian), so with b = C⁺p, g_u = Jᵀa for a = N⁻¹b, ||g_u||² = bᵀCb and Σ_i g_iᵀg_u = Σ_i n_i (Cb)_i:

        w = (Σ_i n_i (Cb)_i / bᵀCb) · N⁻¹ b,   d = Jᵀw.

    When the gradients are linearly dependent (T larger than their rank) U g = p may have no solution,
    the least-squares g_u can conflict with a task and Σ_i g_iᵀĝ_u can be negative (d then points
    against g_u): ConFIG is non-conflicting only for independent gradients, and rescaling one task's
    loss keeps the line of d (g_u does not depend on the norms) but not always its sense.

    Deviations from the official code (tum-pbs/ConFIG, `ConFIG_update`) and TorchJD's `ConFIG`: they
    solve on the N-dimensional U with `lstsq` (official; its rank cut-off is max(T, N)·eps relative on
    the singular values of U on the CPU, none on CUDA) or `pinv` (TorchJD, the same cut-off), and the
    official operator uses an equivalent closed form for T = 2. Here C⁺ drops the eigenvalues of C below
    `rtol` × the largest (default 8·T·eps(G.dtype), the precision of a Gramian: singular values of U
    below ≈ √rtol relative); the results agree unless the unit gradients are that close to linearly
    dependent. Zero-gradient tasks get weight 0 (the official code's nan_to_num of their unit vector
    drops them from U⁺ in the same way). If p has no component in the span of the gradients (up to
    rounding), g_u = 0 and w = 0, as in both. M-ConFIG (momentum, one task gradient per step) is not
    included.
    """
    G0 = G
    G = prepare(G, "config")
    T = G.shape[0]
    p = torch.ones(T, dtype=F64) if pref is None else preference(pref, T, "config")
    w = torch.zeros(T, dtype=F64)
    active, n, C = correlation(G)
    k = active.numel()
    if k == 0:
        return as_output(w, G0)
    cut = 8.0 * k * input_eps(G0) if rtol is None else rtol
    if not (cut >= 0.0):
        raise ValueError(f"config: rtol must be >= 0, got {rtol}")
    pa = p[active]
    b = torch.linalg.pinv(C, rtol=cut, hermitian=True) @ pa
    Cb = C @ b
    gu2 = float(b @ Cb)                                  # ||g_u||²
    lam_max = float(torch.linalg.eigvalsh(C)[-1])
    if not gu2 > k * input_eps(G0) * float(pa @ pa) / max(lam_max, 1e-300):
        return as_output(w, G0)                          # p ⟂ span: no direction
    w[active] = (float((n * Cb).sum()) / gu2) * b / n
    return as_output(w, G0)


@METHODS.register("config", params=GradientParams,
                  description="ConFIG: the direction with equal cosine to every task gradient (pseudo-inverse "
                              "of the unit gradients), length the sum of projections (Liu et al., ICLR 2025).")
class ConFIG(GramianWeighting):
    """ConFIG weights (`config`) on the step's Gramian."""

    # non-conflicting only for linearly independent gradients; a task's loss scale changes only the
    # length (and, for dependent gradients, possibly the sense) of d
    promises = Promises(scaling="line")
    solver = staticmethod(config)
