"""MoDo (Chen, Fernando, Ying & Chen, NeurIPS 2023): multi-objective gradient with double sampling."""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, State
from ..double_sampling import DoubleSampling, project_simplex, square_matrix
from ..solvers import CPU, F64


def modo_step(A: Tensor, lam: Tensor, gamma: float = 1e-3, rho: float = 0.0) -> Tensor:
    r"""One MoDo weight update from the cross-batch matrix A = J₁J₂ᵀ: λ_{t+1}.

    Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023 (arXiv:2305.20057), Algorithm 1:

        λ_{t+1} = Π_Δ(λ_t − γ (∇F(x_t; z₁)ᵀ∇F(x_t; z₂) λ_t + ρ λ_t)),
        x_{t+1} = x_t − α ∇F(x_t; z₃) λ_{t+1},

    one projected step on ½||∇F λ||² + ½ρ||λ||² per training step, its gradient estimated without bias
    from two independent batches z₁, z₂ (A = J₁J₂ᵀ with J the T x N matrix of task gradients), Π_Δ the
    Euclidean projection onto the simplex. γ is not normalised: its effect scales with ||g||².
    """
    A = square_matrix(A, "modo")
    lam = lam.detach().to(device=CPU, dtype=F64)
    return project_simplex(lam - gamma * (A @ lam + rho * lam))


@dataclasses.dataclass
class MoDoParams:
    gamma: float = 1e-3  # step of λ (the paper's Office-31 runs; the code's argument default is 0.1)
    rho: float = 0.0     # ρ, regularisation of λ (the paper's Office-31 runs; argument default 0.1)


@METHODS.register("modo", params=MoDoParams,
                  description="MoDo: MGDA weights by one projected step per training step on two extra batches "
                              "(double sampling), update on the step's batch (Chen et al., NeurIPS 2023); "
                              "parameter space.")
class MoDo(DoubleSampling):
    r"""MoDo (`modo_step`): λ from the step's extra batches 1 and 2 (z₁, z₂), the update Jᵀλ_{t+1} from the
    step's own batch (z₃). λ starts at 1/T and is the method's state (checkpointed).

    Defaults: γ = 1e-3, ρ = 0, the values of the paper's Office-31 experiment (the authors' released logs,
    github.com/heshandevaka/Trade-Off-MOL, LibMTL/examples/office/paper_logs_office-31/perf_logs/MoDo:
    gamma_modo 0.001, rho_modo 0.0); the code's argument defaults, 0.1 and 0.1, are TorchJD's defaults.

    Differences from the official code (the authors' LibMTL fork): it updates the model along
    (∇F(z₁) + ∇F(z₂)) λ_{t+1}, i.e. on the two λ batches without a third one (the JMLR version's eq. 2.9b
    uses their mean); here the update uses a third, independent batch, as Algorithm 1 of the NeurIPS paper
    (and LibMTL, and TorchJD's three-batch example). Task-specific parameters: there they receive both
    batches' gradients; here each head receives its task's gradient on the step's batch. Agrees with
    TorchJD 0.18's `MoDoWeighting` to rounding (tests/test_probe_methods.py).
    """

    def __init__(self, p: MoDoParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if not (p.gamma > 0.0 and math.isfinite(p.gamma)):
            raise ConfigError(f"balancing.gamma: must be a finite number > 0, got {p.gamma}")
        if not (p.rho >= 0.0 and math.isfinite(p.rho)):
            raise ConfigError(f"balancing.rho: must be a finite number >= 0, got {p.rho}")
        self.gamma, self.rho = p.gamma, p.rho
        self.declare_state(lam=torch.full((len(tasks),), 1.0 / len(tasks), dtype=torch.float64))

    def weight_step(self, A: Tensor) -> tuple[Tensor, State]:
        lam = modo_step(A, self.lam, self.gamma, self.rho)
        return lam, {"lam": lam}
