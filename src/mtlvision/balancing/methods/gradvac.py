"""GradVac (Wang et al., ICLR 2021): its Gramian solver and its registration."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ...tasks import Task
from ..base import METHODS, Promises, State
from ..context import StepContext
from ..gradient import GramianWeighting, SeededParams
from ..seeding import Seeded
from ..solvers import CPU, F64, as_output, prepare


def gradvac(G: Tensor, ema: Optional[Tensor] = None, beta: float = 0.01,
            generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    r"""GradVac weights (Gradient Vaccine) and the updated EMA of target similarities.

    Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task Optimization in
    Massively Multilingual Models", ICLR 2021, Algorithm 1. For each task i, g_i' ← g_i; for each
    other task j in random order: φ_ij = cos(g_i', g_j); if φ_ij < φ̂_ij,

        g_i' ← g_i' + ||g_i'|| (φ̂_ij √(1−φ_ij²) − φ_ij √(1−φ̂_ij²)) / (||g_j|| √(1−φ̂_ij²)) · g_j,

    which makes cos(g_i', g_j) exactly φ̂_ij; then (always, as in the paper's algorithm)
    φ̂_ij ← (1−β) φ̂_ij + β φ_ij with the φ_ij measured before the correction. d = Σ_i g_i'.
    With φ̂ = 0 the correction is exactly PCGrad's projection.

    Gramian form: g_i' = Σ_k C_ik g_k, ||g_i'||² = C_i G C_iᵀ, g_i'·g_j = (C_i G)_j; a correction
    adds a to C_ij; w = Σ_i C_i. The T rows are independent sequences of T − 1 corrections, run side
    by side (T − 1 vector steps, not T² scalar ones).

    State: `ema` is the (T, T) matrix φ̂ (diagonal unused; None means zeros, the paper's
    initialisation); the function does not modify it and returns (w, new_ema), new_ema with
    ema's dtype/device (G's if ema is None). Randomness: for each i a permutation of the other
    tasks is drawn with ``torch.randperm(T − 1, generator=generator)`` (TorchJD's draw order).

    Notes: the paper applies GradVac per layer/parameter group; on a Gramian this is the
    whole-model variant (call it once per group's Gramian for the layer-wise one). β = 0.01 is
    this package's default; LibMTL and TorchJD default to 0.5. LibMTL updates the EMA only when a
    correction happens; the paper (and this function, and TorchJD) update it for every pair. Pairs
    where g_i' or g_j is zero (cosine undefined) are skipped and their EMA entry kept. A target
    with |φ̂| ≥ 1 is clamped to ±(1 − 1e-12) in the correction (the exact one is unbounded).
    """
    if not (0.0 <= beta <= 1.0):
        raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
    G0 = G
    G = prepare(G, "gradvac")
    T = G.shape[0]
    if ema is None:
        phi_hat = torch.zeros(T, T, dtype=F64)
        ema_dtype, ema_device = G0.dtype, G0.device
    else:
        if tuple(ema.shape) != (T, T):
            raise ValueError(f"gradvac: ema must have shape ({T}, {T}), got {tuple(ema.shape)}")
        phi_hat = ema.detach().to(device=CPU, dtype=F64).clone()
        if not bool(torch.isfinite(phi_hat).all()):
            raise ValueError("gradvac: ema has NaN or infinite entries")
        ema_dtype, ema_device = ema.dtype, ema.device
    norms = G.diagonal().clamp(min=0.0).sqrt().numpy()
    lim = 1.0 - 1e-12
    # The same draws as the task-by-task loop: for each i in order, a permutation of the other tasks.
    order = np.empty((T, T - 1), dtype=np.int64)
    for i in range(T):
        others = np.array([j for j in range(T) if j != i], dtype=np.int64)
        order[i] = others[torch.randperm(T - 1, generator=generator).numpy()]
    # Every row i runs its own sequence of corrections; the rows are independent, so step k of all rows
    # is one vector operation (row by row the same arithmetic, up to the summation order of ||g_i'||²).
    Gn = G.numpy()
    ph = phi_hat.numpy()
    C = np.eye(T)
    cG = Gn.copy()  # row i: g_i' . g_k
    rows = np.arange(T)
    for k in range(T - 1):
        j = order[:, k]
        ni = np.sqrt(np.maximum(np.einsum("ik,ik->i", cG, C), 0.0))
        nj = norms[j]
        valid = (ni > 0.0) & (nj > 0.0)
        if not valid.any():
            continue
        r, jv, ni_v, nj_v = rows[valid], j[valid], ni[valid], nj[valid]
        phi = np.clip(cG[r, jv] / (ni_v * nj_v), -1.0, 1.0)
        target = ph[r, jv]
        fix = phi < target
        if fix.any():
            tgt = np.clip(target[fix], -lim, lim)
            s_t = np.sqrt(1.0 - tgt * tgt)
            p_f = phi[fix]
            a = ni_v[fix] * (tgt * np.sqrt(1.0 - p_f * p_f) - p_f * s_t) / (nj_v[fix] * s_t)
            rf, jf = r[fix], jv[fix]
            C[rf, jf] += a
            cG[rf] += a[:, None] * Gn[jf]
        ph[r, jv] = (1.0 - beta) * target + beta * phi
    C = torch.from_numpy(C)
    return as_output(C.sum(dim=0), G0), phi_hat.to(device=ema_device, dtype=ema_dtype)


@dataclasses.dataclass
class GradVacParams(SeededParams):
    beta: float = 0.01  # EMA rate of the target similarities (paper's default)


@METHODS.register("gradvac", params=GradVacParams,
                  description="GradVac: raise pairwise gradient similarity to EMA targets "
                              "(Wang et al., ICLR 2021).")
class GradVac(Seeded, GramianWeighting):
    """GradVac weights (`gradvac`); its state is the EMA of target similarities, `ema` (T, T)."""

    promises = Promises(permutation="random_order")

    def __init__(self, p: GradVacParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.init_seed(p.seed)
        self.beta = p.beta
        self.declare_state(ema=torch.zeros(len(tasks), len(tasks), dtype=torch.float64))

    def step(self, G: Tensor, ctx: StepContext) -> tuple[Tensor, State]:
        w, ema = gradvac(G, self.ema, self.beta, self.generator(ctx.epoch, ctx.step))
        return w, {"ema": ema}
