"""PCGrad (Yu et al., NeurIPS 2020): its Gramian solver and its registration."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..gradient import GramianWeighting, SeededParams
from ..seeding import Seeded
from ..solvers import F64, as_output, prepare


def pcgrad(G: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""PCGrad weights (projecting conflicting gradients).

    Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Algorithm 1: for each task
    i, g_i^PC ← g_i; for each other task j in random order, if g_i^PC · g_j < 0 then
    g_i^PC ← g_i^PC − (g_i^PC · g_j)/||g_j||² g_j; the update is d = Σ_i g_i^PC.

    Gramian form: write g_i^PC = Σ_k C_ik g_k, starting from C_i = e_i. Then g_i^PC · g_j =
    (C_i G)_j, and a projection subtracts (C_i G)_j / G_jj from C_ij. The weights are
    w = Σ_i C_i (column sums of C), so d = Jᵀw.

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
    C = torch.eye(T, dtype=F64)
    for i in range(T):
        perm = torch.randperm(T, generator=generator).tolist()
        cG = G[i].clone()  # (C_i G)_k = g_i^PC . g_k
        for j in perm:
            if j == i:
                continue
            dot = float(cG[j])
            gjj = float(G[j, j])
            if dot < 0.0 and gjj > 0.0:
                coef = dot / gjj
                C[i, j] -= coef
                cG -= coef * G[j]
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
