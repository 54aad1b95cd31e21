"""NTKMTL (Qin, Wang, Liao & Yan, NeurIPS 2025): its Gramian solver and its registration."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS
from ..context import StepContext
from ..gradient import GradientParams, GramianWeighting
from ..solvers import F64, as_output, prepare


def ntkmtl(G: Tensor, exponent: float = 0.5) -> Tensor:
    r"""NTKMTL weights (the n = 1 form the authors release and run): w_t = (tr G / G_tt)^exponent.

    Qin, Wang, Liao & Yan, "NTKMTL: Mitigating Task Imbalance in Multi-Task Learning from Neural Tangent
    Kernel Perspective", NeurIPS 2025 (arXiv:2510.18258); code github.com/jianke0604/NTKMTL. Each task's
    convergence speed is read off the largest eigenvalue λ_t of its NTK block; the tasks are balanced by
    w_t = (Σ_i λ_i / λ_t)^{1/2} and the update is d = Σ_t w_t g_t. With n = 1 (each task's loss one output,
    the setting of the released code and of its experiments, "fair to other gradient-oriented methods")
    the block is the scalar λ_t = ||g_t||² = G_tt, so with the default exponent 1/2

        d = sqrt(tr G) Σ_t g_t / ||g_t||,

    the sum of the unit task gradients scaled by the root of their summed squared norms. `exponent` is
    the code's `ntk_exp` (the paper's square root is 0.5; its README suggests trying up to 0.75).

    Tasks with a zero gradient (G_tt ≤ 1e-24 · max_i G_ii, none of whose direction is defined) get weight
    0 (the official code divides by zero); G = 0 returns w = 0.
    """
    G0 = G
    G = prepare(G, "ntkmtl")
    diag = G.diagonal().clamp(min=0.0)
    out = torch.zeros(len(diag), dtype=F64)
    top = float(diag.max())
    if top <= 0.0:
        return as_output(out, G0)
    live = diag > 1e-24 * top
    out[live] = (diag.sum() / diag[live]) ** exponent
    return as_output(out, G0)


@dataclasses.dataclass
class NTKMTLParams(GradientParams):
    exponent: float = 0.5  # the paper's square root of the NTK ratio (`ntk_exp` of the released scripts)


@METHODS.register("ntkmtl", params=NTKMTLParams,
                  description="NTKMTL: weights (tr G / G_tt)^(1/2) balancing the tasks' NTK eigenvalues, n = 1 "
                              "(Qin et al., NeurIPS 2025).")
class NTKMTL(GramianWeighting):
    r"""NTKMTL weights (`ntkmtl`) on the step's Gramian.

    Chosen as the best-supported 2025 method with CelebA (40 attributes) results: NeurIPS 2025, code
    released, CelebA among its benchmarks (run with exactly this n = 1 form, `experiments/celeba/run.sh`),
    and an update fully specified by G. Differences from the official code: it multiplies d by T and
    clips ||d|| to 1 (`max_norm`) — a scale, left to the learning rate and `train.grad_clip`; it runs in
    parameter space (shared parameters), here either space. Not implemented: NTKMTL with n > 1 (per-chunk
    NTK blocks, "for reference, not used in experiments" in the code) and the NTKMTL-SR variant (largest
    eigenvalue of the per-sample representation-gradient kernel, n = 4 chunks), which need per-sample
    losses. Scaling: with exponent 1/2 a task's loss scale changes the update only by a positive factor
    (tested), not for other exponents.
    """

    def __init__(self, p: NTKMTLParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        if not (p.exponent >= 0.0 and math.isfinite(p.exponent)):
            raise ConfigError(f"balancing.exponent: must be a finite number >= 0, got {p.exponent}")
        self.exponent = p.exponent

    def weights(self, G: Tensor, ctx: StepContext) -> Tensor:
        return ntkmtl(G, self.exponent)
