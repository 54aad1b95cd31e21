"""Auto-Lambda (Liu, Davison & Johns, TMLR 2022): task weights learned by a one-step look-ahead."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import Tensor, nn

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, ONE_BACKWARD_LOOKAHEAD, State
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses


@dataclasses.dataclass
class AutoLambdaParams:
    lr: float = 1e-4            # Adam step of λ (authors' dense-prediction experiments; CIFAR-100: 3e-4)
    init: float = 0.1           # initial λ_t (authors' `autol_init`)
    lookahead_lr: float = 0.1   # α of the virtual step (authors: the model's learning rate, 0.1 initially)
    primary: Optional[list[str]] = None  # tasks whose validation loss is minimised (None: all, multi-task)


def adam_step(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, steps: Tensor, lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> State:
    """torch.optim.Adam's update (no weight decay, no amsgrad) as a function: the next x, moments and count."""
    steps = steps + 1
    m = betas[0] * m + (1 - betas[0]) * grad
    v = betas[1] * v + (1 - betas[1]) * grad * grad
    denom = (v / (1 - betas[1] ** steps)).sqrt() + eps
    return {"lam": x - lr * (m / (1 - betas[0] ** steps)) / denom, "adam_m": m, "adam_v": v, "adam_steps": steps}


def _flat_grad(value: Tensor, params: list[nn.Parameter], ctx: StepContext, retain_graph: bool = False) -> Tensor:
    """∇ value over `params` as one vector (zeros where unused), averaged over data-parallel ranks."""
    grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for p, g in zip(params, grads)])
    return ctx.mean_over_ranks(flat)


def _as_shift(flat: Tensor, params: list[nn.Parameter]) -> dict[nn.Parameter, Tensor]:
    return {p: d.view_as(p) for p, d in zip(params, flat.split([p.numel() for p in params]))}


@METHODS.register("auto_lambda", params=AutoLambdaParams,
                  description="Auto-Lambda: task weights learned by Adam from a one-step look-ahead on a validation "
                              "batch (finite-difference meta-gradient; Liu et al., TMLR 2022).")
class AutoLambda(LossWeighting):
    r"""Auto-Lambda (Liu, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR
    2022, arXiv:2202.03091; code github.com/lorenmt/auto-lambda).

    The network is trained on Σ_t λ_t L_t with learned λ, which minimise the primary tasks' validation loss
    after one training step:

        min_λ Σ_{t ∈ P} L_t^val(θ'),   θ' = θ − α ∇_θ Σ_t λ_t L_t^train(θ).

    Meta-gradient as in the authors' code (DARTS-style, first order in θ' plus a finite-difference
    Hessian-vector product): with v = ∇_θ' Σ_{t∈P} L_t^val(θ') and ε = 0.01/||v||,

        ∂/∂λ_t ≈ −α (L_t^train(θ + εv) − L_t^train(θ − εv)) / (2ε).

    Each step: (1) ∇_θ Σ λ_t L_t^train from the step's own forward (every trainable model parameter, as
    the authors' `model.parameters()`); (2) θ' by `ctx.run_probe("val", 0, shift=−α∇)`, v by
    autograd.grad through it; (3) two forwards of the step's batch at θ ± εv (`run_probe("train", 0,
    shift=±εv)`); (4) one Adam step on λ (torch.optim.Adam's update: betas 0.9/0.999, eps 1e-8, no weight
    decay; the authors' `meta_optimizer = optim.Adam([meta_weights], lr=autol_lr)`), (5) the backward of
    Σ_t λ_t L_t with the updated λ, which are the reported weights; the authors likewise update λ before
    the model's step. λ are not constrained (as in the authors' code).

    Defaults: init 0.1 and lr 1e-4 from the authors' dense-prediction (one input, many tasks) experiments,
    trainer_dense.py (their CIFAR-100 multi-domain setting uses 3e-4); α = 0.1, their SGD learning rate.
    Primary tasks: all (the paper's multi-task setting); a subset gives the auxiliary-learning setting.

    Differences from the authors' code. (a) Their virtual step uses the model optimiser's current learning
    rate and adds its momentum buffer and weight decay (θ' = θ − α(m + g + wd·θ)); the balancing interface
    does not see the optimiser, so here α is a fixed parameter and the step is plain gradient descent.
    (b) Their "validation" batch is a second shuffled pass over the training set; here it is the run's
    validation split (`run_probe("val")`, keyed by the step, without augmentation), as in the paper's
    formulation. (c) The virtual step reuses the step's forward pass instead of a second one on the same
    batch (same values up to dropout draws). (d) Their probe forwards update BatchNorm running statistics;
    the probe here leaves them untouched. If ||v|| = 0 the meta-gradient is 0 (their ε would be infinite).

    State: λ and the Adam moments and step count (checkpointed). Data parallel: ∇ and v are averaged over
    ranks and the probe losses are global, so every rank takes the same λ step.
    """

    cost_class = ONE_BACKWARD_LOOKAHEAD
    needs_probe = True
    fd_radius = 0.01  # ε·||v|| of the finite difference (authors' code)

    def __init__(self, p: AutoLambdaParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        for name, value, ok, rule in (("lr", p.lr, p.lr > 0, "> 0"), ("init", p.init, True, "finite"),
                                      ("lookahead_lr", p.lookahead_lr, p.lookahead_lr > 0, "> 0")):
            if not (ok and math.isfinite(value)):
                raise ConfigError(f"balancing.{name}: must be a finite number {rule}, got {value}")
        primary = self.task_names if p.primary is None else list(p.primary)
        unknown = sorted(set(primary) - set(self.task_names))
        if unknown or not primary:
            raise ConfigError(f"balancing.primary: expected a non-empty list of tasks from {self.task_names}, "
                              f"got {p.primary}" + (f" (unknown: {unknown})" if unknown else ""))
        self.lr, self.lookahead_lr, self.primary = p.lr, p.lookahead_lr, [n for n in self.task_names if n in primary]
        f64 = dict(dtype=torch.float64)
        T = len(tasks)
        self.declare_state(lam=torch.full((T,), float(p.init), **f64), adam_m=torch.zeros(T, **f64),
                           adam_v=torch.zeros(T, **f64), adam_steps=torch.zeros((), **f64))

    def meta_gradient(self, loss: Tensor, ctx: StepContext) -> Tensor:
        """∂ L^val(θ − α∇_θ Σλ_t L_t)/∂λ by the authors' finite difference, (T,) float64."""
        params = [p for p in (*ctx.shared_params, *ctx.task_params) if p.requires_grad]
        train = (self.lam.to(loss) * loss).sum()
        step = _flat_grad(train, params, ctx, retain_graph=True) * -self.lookahead_lr
        val = ctx.run_probe("val", 0, shift=_as_shift(step, params))
        v = _flat_grad(sum(val.losses[n] for n in self.primary), params, ctx)
        norm = float(v.double().norm())
        if norm == 0.0:
            return torch.zeros_like(self.lam)
        eps = self.fd_radius / norm
        with torch.no_grad():
            plus, minus = (ctx.run_probe("train", 0, shift=_as_shift(v * s, params)).losses for s in (eps, -eps))
            diff = torch.stack([plus[n].double() - minus[n].double() for n in self.task_names])
        return (-self.lookahead_lr / (2.0 * eps)) * diff.to(self.lam)

    def objective(self, losses: dict[str, Tensor], ctx: StepContext) -> Objective:
        loss = stack_losses(losses, self.task_names)
        grad = self.meta_gradient(loss, ctx)
        state = adam_step(self.lam, grad, self.adam_m, self.adam_v, self.adam_steps, self.lr)
        lam = state["lam"]
        return Objective((lam.to(loss) * loss).sum(), lam, state)
