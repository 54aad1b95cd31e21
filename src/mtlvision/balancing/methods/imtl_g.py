"""IMTL-G (Liu et al., ICLR 2021): its Gramian solver and its registration."""
from __future__ import annotations


import torch
from torch import Tensor

from ..base import METHODS, Promises
from ..gradient import GradientParams, GramianWeighting
from ..solvers import F64, as_output, prepare


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
    G = prepare(G, "imtl_g")
    T = G.shape[0]
    norms = G.diagonal().clamp(min=0.0).sqrt()
    nmax = float(norms.max())
    w = torch.zeros(T, dtype=F64)
    if nmax <= 0.0:
        return as_output(w, G0)
    active = (norms > 1e-12 * nmax).nonzero().squeeze(-1)
    k = active.numel()
    if k == 1:
        w[active] = 1.0
        return as_output(w, G0)
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
            alpha = torch.zeros(k, dtype=F64)
    w[active] = alpha
    return as_output(w, G0)


@METHODS.register("imtl_g", params=GradientParams,
                  description="IMTL-G: update with equal projections on every task's unit gradient "
                              "(Liu et al., ICLR 2021).")
class IMTLG(GramianWeighting):
    """IMTL-G weights (`imtl_g`) on the step's Gramian."""

    promises = Promises(scaling="line")  # d ∝ the equal-projection line; the factor's sign may flip for T ≥ 3
    solver = staticmethod(imtl_g)
