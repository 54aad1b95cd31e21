"""CAGrad (Liu et al., NeurIPS 2021): its Gramian solver and its registration."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ...tasks import Task
from ..base import METHODS
from ..context import StepContext
from ..gradient import GradientParams, GramianWeighting
from ..solvers import F64, GramianSolverError, as_output, mean_diag, min_norm_solve, prepare


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

    Inner solver (exact up to root-finding tolerance, not the paper's scipy SLSQP): using √x =
    min_{t>0} (x/t + t)/2, min_w F = min_{t>0} min_w [g_wᵀg0 + (√φ/2)(||g_w||²/t + t)], which is
    jointly convex in (w, t). For fixed t the inner problem is the min-norm point of the shifted
    points g_i + (t/√φ) g0 (an MGDA problem on a modified Gramian), solved exactly by the active-set
    solver (warm-started from the previous inner solve's support); the outer convex 1-D problem's
    derivative has the sign of t − ||g_w(t)|| and is solved by a bracketed Illinois (regula falsi)
    root search on [0, max_i ||g_i||] to a relative tolerance `tol` (default 1e-12), so F(w*) is
    optimal to about that relative accuracy; `GramianSolverError` if `max_iter` root-search steps do
    not suffice. In the tests the returned d attains the dual value (an optimality certificate) to
    ~1e-12 relative. Two limits are inherent to working from G in floating point: near
    Pareto-stationary points, where ||g_w*|| ≪ max ||g_i||, the direction g_w*/||g_w*|| (and so d)
    is only determined to about eps·max||g_i||²/||g_w*||²; and with task-gradient norms spread over
    more than ~1e4 the shifted Gramians lose the small tasks to rounding.

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
    support = [None]  # the last inner solve's support: a warm start for the next (nearby t, nearby Q)

    def inner(t: float) -> tuple[Tensor, float]:
        a = t / s
        Qs = Gs + a * (torch.outer(bvec, ones) + torch.outer(ones, bvec)) + a * a * g0sq
        w, support[0] = min_norm_solve(Qs, "cagrad", support[0])
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


@dataclasses.dataclass
class CAGradParams(GradientParams):
    c: float = 0.4
    rescale: bool = False  # divide by 1 + c^2 as the official code does


@METHODS.register("cagrad", params=CAGradParams,
                  description="CAGrad: best worst-case improvement within a ball around the mean gradient "
                              "(Liu et al., NeurIPS 2021).")
class CAGrad(GramianWeighting):
    """CAGrad weights (`cagrad`) with the configured `c` and `rescale`."""

    # a task with no labelled row in the batch (loss 0) would make the optimum g_w = 0 and skip the step:
    # it is left out (weight 0; g0 and the ball are the other tasks'), not part of the paper
    skip_absent = True

    def __init__(self, p: CAGradParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.c, self.rescale = p.c, p.rescale

    def weights(self, G: Tensor, ctx: StepContext) -> Tensor:
        return cagrad(G, self.c, rescale=self.rescale)
