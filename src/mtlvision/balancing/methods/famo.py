"""FAMO: Fast Adaptive Multitask Optimization (Liu, Feng, Stone & Liu, NeurIPS 2023)."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, Promises, State
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses


@dataclasses.dataclass
class FAMOParams:
    lr: float = 0.025             # beta: step size of the task logits xi (paper / official code: 0.025)
    weight_decay: float = 0.001   # gamma: regularisation of xi (paper Algorithm 2: 1e-3)
    optimizer: Literal["adam", "sgd"] = "adam"  # adam: Algorithm 2 / official code; sgd: Algorithm 1


@METHODS.register("famo", params=FAMOParams,
                  description="FAMO: weights c_t = softmax(xi)_t / L_t normalised, logits xi learned from the observed "
                              "log-loss decreases (Liu et al., NeurIPS 2023).")
class FAMO(LossWeighting):
    r"""Fast Adaptive Multitask Optimization (FAMO).

    Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
    (arXiv:2306.03792); official code github.com/Cranial-XIX/FAMO.

    Update direction. With task logits xi (T,) and z = softmax(xi), the model follows

        d = sum_t c_t grad L_t,   c_t = (z_t / L_t) / sum_i (z_i / L_i)
          = (sum_i z_i / L_i)^(-1) sum_t z_t grad log L_t,

    a convex combination of the task gradients. One backward pass of sum_t c_t L_t with c detached
    gives exactly d; c_t are the reported weights. As in the official code each L_t is offset by
    eps = 1e-8 (L_t + eps in c and in the logs below; the lower bound L* of the paper is 0 here).

    Weight update. From the change of the log-losses across a model step,
    delta_t = log L_t(before) - log L_t(after), the logits get the gradient
    g = J_z(xi)^T delta = z * (delta - <z, delta>) plus the regulariser gamma * xi:
      * optimizer "sgd" (Algorithm 1): xi <- xi - beta (g + gamma xi);
      * optimizer "adam" (default; the paper's practical Algorithm 2 and the official code, which
        uses torch.optim.Adam(lr=beta, weight_decay=gamma)): one Adam step (betas 0.9/0.999,
        eps 1e-8, bias-corrected) on g + gamma xi.
    Defaults beta = 0.025, gamma = 1e-3 (Algorithm 2 and LibMTL; the official code's default and its
    CelebA script use gamma = 0.01). The xi update is internal: xi and the Adam moments are buffers
    (in state_dict, so checkpointed), never parameters, and never touched by the main optimiser.

    "Loss after the update" (deviation). The official code takes an extra no-grad forward pass on the
    same batch after optimizer.step() to get L(theta_{t+1}) exactly. `Balancer.backward` runs before
    the optimiser step and the trainer does no second forward, so this implementation uses the next
    step's losses instead: at step t it first updates xi with delta = log L(theta_{t-1}; batch t-1) -
    log L(theta_t; batch t) (the losses it saved last step vs. the ones it receives now), then
    weights step t with the updated z. The order of updates matches the official code (xi_t is
    computed from step t-1's outcome and used for step t); the difference is that "after" is measured
    on the next batch rather than the same one, which adds batch-to-batch noise to delta (zero-mean
    across batches, and it is what removes the extra forward pass: FAMO's cost becomes that of plain
    weighted-sum training). The first step has no previous losses and leaves xi at 0 (z uniform).
    The previous losses are a buffer too, so a resumed run continues bit-for-bit (the step that
    crosses an epoch or a resume boundary uses the last step before it as "before").

    Guards. A task whose loss is exactly 0 (absent) gets c_t = 0 and the others are normalised among
    themselves (the official code's 1e-8 offset would instead give the absent task almost all the
    weight, stalling every other task for that step). In the xi update a task absent before or
    after the step has no measured decrease: its delta is set to the z-weighted mean of the others'
    deltas, which makes its logit's gradient exactly 0 and the others' gradient FAMO's gradient on the
    remaining tasks. If no task is present on both sides, xi is not updated that step.

    State: xi, the Adam moments and step count, and the previous losses are declared state: each step
    computes their next values from the current ones and the losses, and returns them.

    Data parallel: the trainer hands every method the global batch's loss values (see
    `training/distributed.py`), so every rank holds the same xi and weights.
    The official implementation also clips the shared gradient norm to 1 inside FAMO; here gradient
    clipping is the trainer's `train.grad_clip`, as for every method.
    """

    promises = Promises(scaling="direction")
    eps = 1e-8
    adam_betas = (0.9, 0.999)
    adam_eps = 1e-8

    def __init__(self, p: FAMOParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if not p.lr > 0:
            raise ConfigError(f"balancing.lr: must be > 0, got {p.lr}")
        if not p.weight_decay >= 0:
            raise ConfigError(f"balancing.weight_decay: must be >= 0, got {p.weight_decay}")
        self.lr, self.weight_decay, self.optimizer = p.lr, p.weight_decay, p.optimizer
        n = len(tasks)
        f64 = dict(dtype=torch.float64)
        self.declare_state(xi=torch.zeros(n, **f64),
                           prev_losses=torch.zeros(n, **f64),  # 0 = absent / no previous step
                           adam_m=torch.zeros(n, **f64), adam_v=torch.zeros(n, **f64),
                           adam_steps=torch.zeros((), **f64))

    def task_weights(self, z: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """c_t = (z_t / (L_t + eps)) / sum over present tasks; 0 for absent tasks."""
        present = loss > 0
        q = torch.where(present, z / (loss + self.eps), torch.zeros_like(z))
        total = q.sum()
        return q / torch.where(total > 0, total, torch.ones_like(total))

    @torch.no_grad()
    def update_logits(self, before: torch.Tensor, after: torch.Tensor) -> State:
        """The logits (and Adam moments) after one FAMO step from the losses before and after a model
        update (0 = absent); the current ones where there is nothing to update."""
        xi, m, v, steps = (self.xi.clone(), self.adam_m.clone(), self.adam_v.clone(), self.adam_steps.clone())
        state = {"xi": xi, "adam_m": m, "adam_v": v, "adam_steps": steps}
        both = (before > 0) & (after > 0)
        if not bool(both.any()):
            return state
        z = torch.softmax(xi, dim=0)
        zero = torch.zeros_like(z)
        delta = torch.where(both, torch.log(before + self.eps) - torch.log(after + self.eps), zero)
        zb = torch.where(both, z, zero)
        # <z, delta> with each unmeasured delta set to the z-weighted mean m of the measured ones is m
        # itself, so J_z^T delta = z * (delta - m) on measured tasks and exactly 0 on the others.
        mean = (zb * delta).sum() / zb.sum()
        grad = torch.where(both, z * (delta - mean), zero) + self.weight_decay * xi
        if self.optimizer == "sgd":
            xi -= self.lr * grad
            return state
        b1, b2 = self.adam_betas
        steps += 1
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat = m / (1 - b1 ** steps)
        v_hat = v / (1 - b2 ** steps)
        xi -= self.lr * m_hat / (v_hat.sqrt() + self.adam_eps)
        return state

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        loss = stack_losses(losses, self.task_names)
        with torch.no_grad():
            now = loss.detach().to(self.xi.dtype)
            state = self.update_logits(self.prev_losses, now)
            c = self.task_weights(torch.softmax(state["xi"], dim=0), now)
            state["prev_losses"] = now.clone()
        return Objective((c.to(loss.dtype) * loss).sum(), c, state)
