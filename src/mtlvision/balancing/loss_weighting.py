"""Adaptive loss-weighting methods: each step is one backward pass of a scalar built from the losses.

    uw      Uncertainty Weighting          Kendall, Gal & Cipolla, CVPR 2018
    dwa     Dynamic Weight Average         Liu, Johns & Davison, CVPR 2019
    rlw     Random Loss Weighting          Lin, Ye, Zhang & Tsang, TMLR 2022
    gls     Geometric Loss Strategy        Chennupati, Sistu, Yogamani & Rawashdeh, CVPR-W 2019
    imtl_l  IMTL, loss-balance part        Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, ICLR 2021
    famo    Fast Adaptive Multitask Opt.   Liu, Feng, Stone & Liu, NeurIPS 2023

Every `backward` returns the weight each task's loss received in the step (the coefficient of
grad L_t in the gradient that reached the network), as floats for telemetry.

Absent tasks. A task whose loss is exactly 0 in a batch (`Task.loss` returns 0 when no sample of the
batch is labelled for it) carries no information about the task. The methods below treat such a task
as absent for that step: it contributes no term (so no log(0), no 1/0 and no learnable scale driven
by a regulariser alone), its reported weight is finite, and the other tasks are weighted exactly as
the method would weight them without it. Each class says what this means for it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..tasks import Task
from .base import METHODS, Balancer, StepContext


def _stack(losses: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The task losses as one (T,) tensor in task order (keeps the graph)."""
    missing = [n for n in names if n not in losses]
    if missing:
        raise KeyError(f"losses for task(s) {missing} are missing; got {sorted(losses)}")
    return torch.stack([losses[n].reshape(()) for n in names])


def _as_dict(names: list[str], weights: torch.Tensor) -> dict[str, float]:
    return dict(zip(names, (float(w) for w in weights.detach().cpu().tolist())))


# -- Uncertainty Weighting --------------------------------------------------------------------------

@dataclasses.dataclass
class UncertaintyParams:
    # "log_sigma": L = sum_t exp(-s_t) L_t + s_t / 2 (Kendall et al. eq. 10, classification; optimum 1/(2 L_t))
    # "log_var":   L = sum_t exp(-s_t) L_t + s_t     (log sigma^2 regulariser; optimum 1/L_t; equals IMTL-L)
    regulariser: Literal["log_sigma", "log_var"] = "log_sigma"


@METHODS.register("uw", params=UncertaintyParams,
                  description="Uncertainty weighting: learned log-variances s_t, sum_t exp(-s_t) L_t + s_t/2 "
                              "(Kendall, Gal & Cipolla, CVPR 2018).")
class UncertaintyWeighting(Balancer):
    r"""Uncertainty Weighting (UW).

    Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
    Geometry and Semantics", CVPR 2018 (arXiv:1705.07115).

    Each task has a learnable log-variance s_t = log sigma_t^2 (an nn.Parameter, initialised to 0,
    i.e. sigma^2 = 1 and weight 1; it joins the main optimiser with no weight decay), and one
    backward pass is taken of the paper's classification objective (eq. 10, softmax scaled by 1/sigma^2)

        L = sum_t 1/sigma_t^2 L_t + log sigma_t = sum_t exp(-s_t) * L_t + s_t / 2     (default)

    so the network receives sum_t exp(-s_t) grad L_t, dL/ds_t = 1/2 - exp(-s_t) L_t, and at the
    optimum in s_t the weight is exp(-s_t) = 1/(2 L_t). Reported weights: exp(-s_t).

    `regulariser: log_var` uses log sigma^2 = s as the regulariser instead (the form of the authors'
    released example code, precision * loss + log_var): the same relative task weights at twice the
    overall scale (1/L_t). That variant equals IMTL-L's sum_t exp(s'_t) L_t - s'_t under s'_t = -s_t,
    which is why the paper's eq. 10 is the default here.

    Absent tasks (L_t == 0): the term exp(-s_t) L_t + s_t is left out for that step, so s_t gets a
    zero gradient instead of being pushed to -inf by the regulariser alone.
    """

    def __init__(self, p: UncertaintyParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.reg_scale = 1.0 if p.regulariser == "log_var" else 0.5  # coefficient of s_t
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)))

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        loss = _stack(losses, self.task_names)
        present = (loss.detach() != 0).to(loss.dtype)
        s = self.log_vars.to(loss.dtype)
        total = (present * (torch.exp(-s) * loss + self.reg_scale * s)).sum()
        total.backward()
        return _as_dict(self.task_names, torch.exp(-self.log_vars.detach()))


# -- Dynamic Weight Average -------------------------------------------------------------------------

@dataclasses.dataclass
class DWAParams:
    temperature: float = 2.0  # tau in w_t = T softmax(r_t / tau); the paper uses 2


@METHODS.register("dwa", params=DWAParams,
                  description="Dynamic Weight Average: w = T softmax(r/tau), r_t = epoch-loss ratio L_t(e-1)/L_t(e-2) "
                              "(Liu, Johns & Davison, CVPR 2019).")
class DynamicWeightAverage(Balancer):
    r"""Dynamic Weight Average (DWA).

    Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
    (arXiv:1803.10704):

        w_t(e) = T * exp(r_t(e-1) / tau) / sum_i exp(r_i(e-1) / tau),   r_t(e-1) = L_t(e-1) / L_t(e-2)

    where L_t(e) is task t's mean training loss over epoch e (given by the trainer's `epoch_end`),
    T the number of tasks and tau the temperature (2 in the paper). w = 1 for the first two epochs
    (e = 0, 1; the paper's "r_k(t) = 1 for t = 1, 2"). The weights are fixed for a whole epoch and
    each step back-propagates sum_t w_t L_t.

    The epoch-mean losses of the last two epochs are kept by epoch number in `extra_state`, so a
    resumed run uses exactly the weights the uninterrupted one would. The weights of epoch e use the
    means of epochs e-1 and e-2 only; if either is unknown the weights are all 1.

    Guards: a ratio whose denominator is 0 (a task never labelled in epoch e-2) or that is not finite
    is replaced by 1, the neutral "no change" ratio. A batch with a zero loss needs no guard (the
    weights do not depend on the batch).
    """

    def __init__(self, p: DWAParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if not p.temperature > 0:
            raise ConfigError(f"balancing.temperature: must be > 0, got {p.temperature}")
        self.temperature = p.temperature
        self.history: dict[int, dict[str, float]] = {}  # epoch -> mean training loss per task
        self._cache: tuple[int, dict[str, float]] = (-1, {})

    def weights(self, epoch: int) -> dict[str, float]:
        """The task weights used throughout epoch `epoch` (0-based)."""
        if self._cache[0] == epoch:
            return self._cache[1]
        names = self.task_names
        prev, prev2 = self.history.get(epoch - 1), self.history.get(epoch - 2)
        if epoch < 2 or prev is None or prev2 is None:
            w = {n: 1.0 for n in names}
        else:
            ratios = []
            for n in names:
                num, den = float(prev[n]), float(prev2[n])
                r = num / den if den > 0 else 1.0
                ratios.append(r if math.isfinite(r) else 1.0)
            z = np.asarray(ratios, dtype=np.float64) / self.temperature
            e = np.exp(z - z.max())
            w = dict(zip(names, (len(names) * e / e.sum()).tolist()))
        self._cache = (epoch, w)
        return w

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        w = self.weights(ctx.epoch)
        total = sum(w[n] * losses[n] for n in self.task_names)
        total.backward()
        return dict(w)

    def epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        self.history[epoch] = {n: float(mean_losses[n]) for n in self.task_names}
        for old in [e for e in self.history if e < epoch - 1]:
            del self.history[old]
        self._cache = (-1, {})

    def extra_state(self) -> dict[str, Any]:
        return {"history": [{"epoch": e, "losses": dict(v)} for e, v in sorted(self.history.items())]}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.history = {int(h["epoch"]): {n: float(h["losses"][n]) for n in self.task_names}
                        for h in state.get("history", [])}
        self._cache = (-1, {})


# -- Random Loss Weighting --------------------------------------------------------------------------

@dataclasses.dataclass
class RLWParams:
    # Seed of the weight draws; null: the torch seed in force when the method is built (the trainer
    # seeds torch with the run's `seed` just before, so each run seed gets its own weight sequence).
    seed: Optional[int] = None


@METHODS.register("rlw", params=RLWParams,
                  description="Random loss weighting: w = softmax(x), x ~ N(0, I) drawn afresh each step "
                              "(Lin et al., TMLR 2022).")
class RandomLossWeighting(Balancer):
    r"""Random Loss Weighting (RLW).

    Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning", TMLR 2022 (arXiv:2111.10603). Each step draws x ~ N(0, I_T) (the paper's
    default distribution), sets w = softmax(x) (so w_t > 0 and sum_t w_t = 1) and back-propagates
    sum_t w_t L_t.

    Reproducibility: the draw does not touch the global torch RNG. Step (epoch, step) uses a private
    CPU torch.Generator seeded with numpy.random.SeedSequence([seed, epoch, step]) (64 well-mixed
    bits), so the weights are a pure function of (seed, epoch, step): a run, its rerun and a run
    resumed from any checkpoint draw the same weights at the same step, and data-parallel ranks
    agree without communicating. `seed` (null by default: the torch seed at build time, which the
    trainer sets to the run's seed) is saved in `extra_state` and restored on resume.

    A zero loss needs no guard: the weights do not depend on the losses.
    """

    def __init__(self, p: RLWParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.seed = int(p.seed if p.seed is not None else torch.initial_seed()) % 2**64

    def weights(self, epoch: int, step: int) -> torch.Tensor:
        """The (T,) weights of step `step` in epoch `epoch`."""
        state = np.random.SeedSequence([self.seed, int(epoch), int(step)]).generate_state(1, np.uint64)[0]
        gen = torch.Generator(device="cpu").manual_seed(int(state))
        x = torch.randn(len(self.task_names), generator=gen, dtype=torch.float64)
        return torch.softmax(x, dim=0)

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        w = self.weights(ctx.epoch, ctx.step)
        loss = _stack(losses, self.task_names)
        (w.to(device=loss.device, dtype=loss.dtype) * loss).sum().backward()
        return _as_dict(self.task_names, w)

    def extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        if "seed" in state:
            self.seed = int(state["seed"])


# -- Geometric Loss Strategy ------------------------------------------------------------------------

@METHODS.register("gls", description="Geometric loss strategy: minimise the geometric mean (prod_t L_t)^(1/T) "
                                     "(Chennupati et al., CVPR-W 2019).")
class GeometricLossStrategy(Balancer):
    r"""Geometric Loss Strategy (GLS).

    Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
    Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019 (WAD).
    One backward pass of the geometric mean of the task losses,

        L = (prod_t L_t)^(1/T) = exp((1/T) sum_t log L_t),

    computed in log space (no under/overflow of the product). The implied weight of task t, reported
    for telemetry, is dL/dL_t = L / (T L_t): tasks with smaller losses get larger weights, which is
    the method's intended focus on the harder-to-improve, already-small losses.

    Guard (log 0): a task whose loss is exactly 0 in the batch is left out of the product -- the step
    minimises the geometric mean of the present tasks (T counts only those), and the absent task's
    reported weight is 0. Without this, one zero factor makes the product 0 and its gradient with
    respect to every other task 0 (and its own infinite). Losses below the smallest normal float are
    clamped inside the log so 1/L_t stays finite. If no task is present the step back-propagates a
    zero (every gradient 0).
    """

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        loss = _stack(losses, self.task_names)
        present = loss.detach() != 0
        n = present.sum().clamp(min=1).to(loss.dtype)
        tiny = torch.finfo(loss.dtype).tiny
        logs = torch.where(present, torch.log(loss.clamp(min=tiny)), torch.zeros_like(loss))
        total = torch.exp(logs.sum() / n)
        total = torch.where(present.any(), total, loss.sum() * 0.0)
        total.backward()
        g = total.detach()
        w = torch.where(present, g / (n * loss.detach().clamp(min=tiny)), torch.zeros_like(loss))
        return _as_dict(self.task_names, w)


# -- IMTL-L -----------------------------------------------------------------------------------------

@METHODS.register("imtl_l", description="IMTL-L: learned scales s_t, sum_t exp(s_t) L_t - s_t, so exp(s_t) L_t -> 1 "
                                        "(Liu et al., ICLR 2021).")
class IMTLL(Balancer):
    r"""IMTL-L, the loss-balance half of Impartial Multi-Task Learning.

    Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
    ICLR 2021. Each task has a learnable scale parameter s_t (nn.Parameter, init 0, in the main
    optimiser without weight decay) and one backward pass is taken of

        L = sum_t exp(s_t) L_t - s_t.

    The network receives sum_t exp(s_t) grad L_t; dL/ds_t = exp(s_t) L_t - 1, so at the optimum in s
    every scaled loss exp(s_t) L_t equals 1 (the paper's "impartial" loss scales). Reported weights:
    exp(s_t). This is IMTL-L alone (the paper's loss-balance ablation), without IMTL-G's gradient
    step. (It coincides with `uw` in its default form under s_t -> -s_t.)

    Absent tasks (L_t == 0): the term is left out for that step, so s_t gets a zero gradient instead
    of the regulariser's constant push towards +inf.
    """

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.log_scales = nn.Parameter(torch.zeros(len(tasks)))

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        loss = _stack(losses, self.task_names)
        present = (loss.detach() != 0).to(loss.dtype)
        s = self.log_scales.to(loss.dtype)
        (present * (torch.exp(s) * loss - s)).sum().backward()
        return _as_dict(self.task_names, torch.exp(self.log_scales.detach()))


# -- FAMO -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class FAMOParams:
    lr: float = 0.025             # beta: step size of the task logits xi (paper / official code: 0.025)
    weight_decay: float = 0.001   # gamma: regularisation of xi (paper Algorithm 2: 1e-3)
    optimizer: Literal["adam", "sgd"] = "adam"  # adam: Algorithm 2 / official code; sgd: Algorithm 1


@METHODS.register("famo", params=FAMOParams,
                  description="FAMO: weights c_t = softmax(xi)_t / L_t normalised, logits xi learned from the observed "
                              "log-loss decreases (Liu et al., NeurIPS 2023).")
class FAMO(Balancer):
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

    Data parallel: the trainer hands every method the global batch's loss values (see
    `training/distributed.py`), so every rank holds the same xi and weights.
    The official implementation also clips the shared gradient norm to 1 inside FAMO; here gradient
    clipping is the trainer's `train.grad_clip`, as for every method.
    """

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
        self.register_buffer("xi", torch.zeros(n, **f64))
        self.register_buffer("prev_losses", torch.zeros(n, **f64))  # 0 = absent / no previous step
        self.register_buffer("adam_m", torch.zeros(n, **f64))
        self.register_buffer("adam_v", torch.zeros(n, **f64))
        self.register_buffer("adam_steps", torch.zeros((), **f64))

    def task_weights(self, z: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """c_t = (z_t / (L_t + eps)) / sum over present tasks; 0 for absent tasks."""
        present = loss > 0
        q = torch.where(present, z / (loss + self.eps), torch.zeros_like(z))
        total = q.sum()
        return q / torch.where(total > 0, total, torch.ones_like(total))

    @torch.no_grad()
    def update_logits(self, before: torch.Tensor, after: torch.Tensor) -> None:
        """One FAMO step on xi from the losses before and after a model update (0 = absent)."""
        both = (before > 0) & (after > 0)
        if not bool(both.any()):
            return
        z = torch.softmax(self.xi, dim=0)
        zero = torch.zeros_like(z)
        delta = torch.where(both, torch.log(before + self.eps) - torch.log(after + self.eps), zero)
        zb = torch.where(both, z, zero)
        # <z, delta> with each unmeasured delta set to the z-weighted mean m of the measured ones is m
        # itself, so J_z^T delta = z * (delta - m) on measured tasks and exactly 0 on the others.
        mean = (zb * delta).sum() / zb.sum()
        grad = torch.where(both, z * (delta - mean), zero) + self.weight_decay * self.xi
        if self.optimizer == "sgd":
            self.xi -= self.lr * grad
            return
        b1, b2 = self.adam_betas
        self.adam_steps += 1
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = self.adam_steps
        m_hat = self.adam_m / (1 - b1 ** t)
        v_hat = self.adam_v / (1 - b2 ** t)
        self.xi -= self.lr * m_hat / (v_hat.sqrt() + self.adam_eps)

    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        loss = _stack(losses, self.task_names)
        with torch.no_grad():
            now = loss.detach().to(self.xi.dtype)
            self.update_logits(self.prev_losses, now)
            c = self.task_weights(torch.softmax(self.xi, dim=0), now)
            self.prev_losses.copy_(now)
        (c.to(loss.dtype) * loss).sum().backward()
        return _as_dict(self.task_names, c)
