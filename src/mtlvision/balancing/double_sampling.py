"""Double sampling (SDMGrad, MoDo): task weights updated from two independent mini-batches.

A stochastic MGDA-type weight update needs ∇F(x)ᵀ∇F(x) λ, the gradient of ½||∇F(x) λ||² in λ. Taking
both factors from one mini-batch z gives E[J_zᵀJ_z] ≠ E[J_z]ᵀE[J_z]: a biased estimate. Double sampling
takes them from two independent batches z₁, z₂, whose cross-Gramian A = J₁J₂ᵀ (T x T, not symmetric)
has E[A] = E[J]E[J]ᵀ. The update direction then uses a third batch: the step's own, so the trunk
receives exactly Jᵀw of the step's batch (a weighted loss sum).

The two batches are the trainer's keyed extra training batches 1 and 2 of the step (`ctx.run_probe`);
their Jacobians are taken in parameter space with the same `GradientSpace.jacobian` as the step's own,
and A is the off-diagonal block of the Gramian of [J₁; J₂], so data-parallel ranks share it exactly as
they share G. Parameter space only: in feature space a task's gradient is per example (row b of J is
∂L/∂z_b of example b), so a product across two batches would pair unrelated examples; there the
one-batch Gramian is already the unbiased per-example estimate, and double sampling has no meaning.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..tasks import Task
from .base import GRADIENT_TWO_EXTRA_BATCHES, State
from .context import StepContext
from .gradient import Combination, GradientMethod, GradientParams, TaskGradients
from .solvers import CPU, F64


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of v (T,) onto the probability simplex {w ≥ 0, Σw = 1}, float64 on the CPU.

    Sort-based, exact (Held, Wolfe & Crowder 1974; Duchi et al. 2008): with u = v sorted decreasingly and
    ρ the largest k with u_k > (Σ_{i≤k} u_i − 1)/k, the projection is max(v − θ, 0), θ = (Σ_{i≤ρ} u_i − 1)/ρ.
    """
    v = v.detach().to(device=CPU, dtype=F64).reshape(-1)
    if not bool(torch.isfinite(v).all()):
        raise ValueError("project_simplex: the vector has NaN or infinite entries")
    u = torch.sort(v, descending=True).values
    ks = torch.arange(1, len(u) + 1, dtype=F64)
    thresholds = (torch.cumsum(u, 0) - 1.0) / ks
    rho = int((u > thresholds).nonzero().max())
    return (v - thresholds[rho]).clamp(min=0.0)


def square_matrix(A: Tensor, name: str) -> Tensor:
    """A (T, T) validated (square, non-empty, finite) as a float64 CPU copy; not symmetrised (J₁J₂ᵀ is not)."""
    A = A.detach().to(device=CPU, dtype=F64)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or A.shape[0] == 0:
        raise ValueError(f"{name}: A must be a non-empty square (T, T) matrix, got shape {tuple(A.shape)}")
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name}: A has NaN or infinite entries (non-finite task gradients)")
    return A


def cross_gramian(method: GradientMethod, ctx: StepContext, first: int = 1, second: int = 2) -> Tensor:
    """A = J₁J₂ᵀ (T x T, float64, CPU) of the step's extra training batches `first` and `second`."""
    names, space = method.task_names, method.gradient_space
    rows = []
    for index in (first, second):
        probe = ctx.run_probe("train", index)
        rows.append(space.jacobian([probe.losses[n] for n in names], probe.ctx).matrix)
    gram = space.gramian(torch.cat(rows), probe.ctx).detach().to(device=CPU, dtype=F64)
    if not bool(torch.isfinite(gram).all()):
        raise ValueError(f"{type(method).__name__}: the extra batches' task gradients have NaN or infinite entries")
    T = len(names)
    return gram[:T, T:]


class DoubleSampling(GradientMethod):
    """Base of double-sampling methods: implement `weight_step(A) -> (w, next state)` from A = J₁J₂ᵀ;
    the trunk receives d = Jᵀw for the step's own J (parameter space)."""

    cost_class = GRADIENT_TWO_EXTRA_BATCHES
    spaces = ("parameter",)
    needs_probe = True

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(GradientParams(space="parameter"), tasks)

    def weight_step(self, A: Tensor) -> tuple[Tensor, State]:
        raise NotImplementedError

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        w, state = self.weight_step(cross_gramian(self, ctx))
        w = w.to(device=grads.matrix.device, dtype=grads.matrix.dtype)
        return Combination(w @ grads.matrix, w, state=state)
