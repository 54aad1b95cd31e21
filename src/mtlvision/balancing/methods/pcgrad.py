"""PCGrad (Yu et al., NeurIPS 2020): its Gramian solver and its registration."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..gradient import GramianWeighting, SeededParams
from ..seeding import Seeded
from ..solvers import as_output, prepare


def pcgrad(G: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""PCGrad weights (projecting conflicting gradients).

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each task
    i, g_i^PC ← g_i; for each other task j in random order, if g_i^PC · g_j < 0 then
    g_i^PC ← g_i^PC − (g_i^PC · g_j)/||g_j||² g_j; the update is d = Σ_i g_i^PC.

    Gramian form: write g_i^PC = Σ_k C_ik g_k, starting from C_i = e_i. Then g_i^PC · g_j =
    (C_i G)_j, and a projection subtracts (C_i G)_j / G_jj from C_ij. The weights are
    w = Σ_i C_i (column sums of C), so d = Jᵀw. The T rows are independent sequences of T − 1
    projections, run side by side (T − 1 vector steps, not T² scalar ones).

    Randomness: for each i independently, a permutation of 0..T−1 is drawn with
    ``torch.randperm(T, generator=generator)`` and i is skipped (a uniformly random order of the
    other tasks; the same draws as TorchJD's PCGrad when seeded alike). `generator=None` uses
    torch's global RNG. Deviation notes: the update is the paper's sum; the popular PyTorch port
    (WeiChengTseng/Pytorch-PCGrad) averages instead (w/T). Tasks with a zero gradient are never
    projected on (they cannot conflict).
    """
    G0 = G
    G = prepare(G, "pcgrad")
    T = G.shape[0]
    # The same draws as the task-by-task loop: one permutation per task i, in order, i itself skipped.
    order = np.array([[j for j in torch.randperm(T, generator=generator).tolist() if j != i] for i in range(T)],
                     dtype=np.int64).reshape(T, T - 1)
    # Every row i runs its own sequence of projections; the rows are independent, so step k of all rows
    # is one vector operation (the same arithmetic as row by row, in the same order within a row).
    Gn = G.numpy()
    diag = Gn.diagonal().copy()
    C = np.eye(T)
    cG = Gn.copy()  # row i: (C_i G)_k = g_i^PC . g_k
    rows = np.arange(T)
    for k in range(T - 1):
        j = order[:, k]
        dot = cG[rows, j]
        gjj = diag[j]
        project = (dot < 0.0) & (gjj > 0.0)
        if not project.any():
            continue
        coef = np.where(project, dot / np.where(project, gjj, 1.0), 0.0)
        r = rows[project]
        C[r, j[project]] -= coef[project]
        cG[r] -= coef[project, None] * Gn[j[project]]
    C = torch.from_numpy(C)
    return as_output(C.sum(dim=0), G0)


@METHODS.register("pcgrad", params=SeededParams,
                  description="PCGrad: project away conflicting components in random task order "
                              "(Yu et al., NeurIPS 2020).")
class PCGrad(Seeded, GramianWeighting):
    """PCGrad weights (`pcgrad`) with the task orders drawn from the step's keyed generator."""

    promises = Promises(permutation="random_order")

    def __init__(self, p: SeededParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.init_seed(p.seed)

    def weights(self, G: Tensor, ctx: StepContext) -> Tensor:
        return pcgrad(G, self.generator(ctx.epoch, ctx.step))
