"""ExcessMTL, task weights from estimated excess risks (He et al., ICML 2024): parameter space."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from ...tasks import Task
from ..base import GRADIENT_PARAMETER, METHODS, Promises, State
from ..context import StepContext
from ..gradient import Combination, GradientMethod, GradientParams, TaskGradients


@dataclasses.dataclass
class ExcessMTLParams:
    robust_step_size: float = 0.01  # eta_alpha of the exponentiated-gradient step (authors' config default)
    warmup_epochs: int = 0  # epochs with fixed weights whose mean excess risks become the baseline (0: first step)


def excess_risks(jacobian: torch.Tensor, sq_sum: torch.Tensor, eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """The excess-risk estimates e_t = g_tᵀ diag(h_t)⁻¹ g_t, h_t = sqrt(S_t + eps) with S_t = S_t + g_t ⊙ g_t
    (float64), and the updated accumulator S."""
    g = jacobian.detach().to(torch.float64)
    sq_sum = sq_sum + g * g
    return (g * g / torch.sqrt(sq_sum + eps)).sum(1), sq_sum


@METHODS.register("excess_mtl", params=ExcessMTLParams,
                  description="ExcessMTL: weights by exponentiated gradient on excess risks g^T H^-1 g estimated "
                              "with an Adagrad diagonal (He et al., ICML 2024); parameter space.")
class ExcessMTL(GradientMethod):
    r"""Robust Multi-Task Learning with Excess Risks (ExcessMTL).

    He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess Risks",
    ICML 2024 (arXiv:2402.02009); authors' code github.com/yifei-he/ExcessMTL (also uiuctml/ExcessMTL),
    LibMTL/LibMTL/weighting/ExcessMTL.py, the file LibMTL ships. Tasks are weighted by their distance to
    convergence (excess risk L_t(θ) − L_t(θ_t*)) instead of their loss, so a task with label noise (a large
    Bayes error but little left to learn) is not up-weighted. Per step, with g_t = ∇_θ L_t at the trunk
    parameters:

        S_t ← S_t + g_t ⊙ g_t,   h_t = sqrt(S_t + 1e-7)         diagonal (Adagrad / empirical Fisher) Hessian
        e_t = g_tᵀ diag(h_t)⁻¹ g_t                               second-order Taylor estimate of the excess risk
        r_t = e_t / e_t⁰                                          scale normalisation by the initial excess risk
        α_t ← α_t exp(η r_t) / Σ_i α_i exp(η r_i)                 exponentiated gradient (α on the simplex)
        d = T Σ_t α_t g_t                                         the trunk update; reported weights T α_t

    (The Taylor estimate's factor ½ cancels in r.) α starts uniform; T α sums to T, so the first steps
    equal equal weighting, as in the authors' code (weights initialised to 1, normalised to sum T). e⁰ is
    the first step's e (the authors' code: its first step only records e⁰, which is exactly r = 1 for every
    task, i.e. no change of α); `warmup_epochs: k` keeps α uniform for k epochs and takes e⁰ as the mean
    e_t over them (TorchJD's n_warmup_steps; S accumulates throughout). Heads receive the plain sum of
    their task's gradients. The update d is Jᵀw with w = T α of this step (α is updated before d, as in
    the authors' code).

    Defaults: η = 0.01, the authors' config default (their README's Office-Home command uses 1.0; TorchJD's
    default is 1.0). The estimate needs g_t with respect to the parameters θ being trained (S is a running
    per-parameter accumulator), so this method works in parameter space only: at the shared representation
    the coordinates are (example, unit) pairs of a different batch every step, so a per-coordinate
    accumulation has no meaning (LibMTL's `rep_grad` variant sums the representation gradients over the
    batch first; it is not the paper's estimate and is not offered).

    Differences: TorchJD 0.18 (`ExcessMTLWeighting`) normalises α to sum 1 (here T α is reported), and on its
    first call without warm-up updates α with the raw e (not e/e⁰); with n_warmup_steps = 1 it equals this
    method up to its 1e-7 added to e⁰ (tests compare the two). Absent tasks (loss exactly 0: no labelled
    sample; their g_t is 0) carry no estimate: their α_t is kept, the present tasks' α are updated among
    themselves (their total mass unchanged), and a task's e⁰ is taken at its first present step with
    e > 0. In warm-up, means count present steps only.

    State (declared, checkpointed): α (`alpha`), S (`sq_sum`, T × trunk parameters, sized on first use,
    as much memory as the trunk's parameters per task), e⁰ (`baseline`, 0 = not measured), and the warm-up
    sums and counts. Parameter space: J is the rank average, so every rank holds the same state.
    """

    cost_class = GRADIENT_PARAMETER
    spaces = ("parameter",)
    promises = Promises()

    def __init__(self, p: ExcessMTLParams, tasks: list[Task]) -> None:
        super().__init__(GradientParams(space="parameter"), tasks)
        if not p.robust_step_size > 0 or p.robust_step_size == float("inf"):
            raise ConfigError(f"balancing.robust_step_size: must be finite and > 0, got {p.robust_step_size}")
        if isinstance(p.warmup_epochs, bool) or not p.warmup_epochs >= 0:
            raise ConfigError(f"balancing.warmup_epochs: must be an integer >= 0, got {p.warmup_epochs}")
        self.eta, self.warmup_epochs = float(p.robust_step_size), int(p.warmup_epochs)
        n = len(tasks)
        f64 = dict(dtype=torch.float64)
        self.declare_state(alpha=torch.full((n,), 1.0 / n, **f64), sq_sum=torch.zeros(0, **f64),
                           baseline=torch.zeros(n, **f64), warmup_sum=torch.zeros(n, **f64),
                           warmup_count=torch.zeros(n, **f64))

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        J = grads.matrix
        previous = self.sq_sum if self.sq_sum.shape == J.shape else torch.zeros(J.shape, dtype=torch.float64)
        e, sq_sum = excess_risks(J, previous.to(J.device))
        e = e.to(self.alpha.device)  # the small state lives where the method's buffers do
        present = grads.losses.to(self.alpha.device) != 0
        state: State = {"sq_sum": sq_sum}
        if ctx.epoch < self.warmup_epochs:
            state["warmup_sum"] = self.warmup_sum + torch.where(present, e, 0.0)
            state["warmup_count"] = self.warmup_count + present.to(torch.float64)
            alpha = self.alpha
        else:
            alpha, state["baseline"] = self.update_alpha(e, present)
        state["alpha"] = alpha
        w = len(alpha) * alpha
        return Combination(w.to(J.dtype).to(J.device) @ J, w, state=state)

    def update_alpha(self, e: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """α after one exponentiated-gradient step on r = e / e⁰ over the present tasks, and e⁰ (set where missing)."""
        mean = self.warmup_sum / self.warmup_count.clamp(min=1.0)
        fresh = torch.where((self.warmup_count > 0) & (mean > 0), mean, torch.where(present, e, 0.0))
        baseline = torch.where(self.baseline > 0, self.baseline, fresh)
        usable = present & (baseline > 0)
        if not bool(usable.any()):
            return self.alpha.clone(), baseline
        r = torch.where(usable, e / torch.where(usable, baseline, 1.0), 0.0)
        logits = torch.where(usable, torch.log(self.alpha) + self.eta * r, -torch.inf)
        mass = self.alpha[usable].sum()
        if not mass > 0:  # every present task's weight underflowed to 0: nothing to update
            return self.alpha.clone(), baseline
        return torch.where(usable, mass * torch.softmax(logits, 0), self.alpha), baseline
