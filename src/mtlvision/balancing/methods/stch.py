"""STCH, smooth Tchebycheff scalarisation (Lin et al., ICML 2024)."""
from __future__ import annotations

import dataclasses

import torch

from ...errors import ConfigError
from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..loss import LossWeighting, Objective, stack_losses


@dataclasses.dataclass
class STCHParams:
    mu: float = 1.0  # smoothing parameter (the authors' MTL code: STCH_mu = 1)
    warmup_epochs: int = 5  # epochs of sum_t log L_t; the last one measures the normaliser (authors: 4 + 1)
    preference: dict[str, float] = dataclasses.field(default_factory=dict)  # lambda_t > 0 (unlisted: 1)


@METHODS.register("stch", params=STCHParams,
                  description="STCH: smooth Tchebycheff scalarisation T mu log sum_t exp(lambda_t log(L_t/n_t) / mu) "
                              "of the normalised log-losses, after warm-up epochs of sum_t log L_t "
                              "(Lin et al., ICML 2024).")
class STCH(LossWeighting):
    r"""Smooth Tchebycheff scalarisation (STCH).

    Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
    Optimization", ICML 2024 (arXiv:2402.19078); the authors' MTL code is github.com/Xi-L/STCH,
    STCH_MTL/LibMTL/weighting/STCH.py (LibMTL ships the same file). The paper's scalarisation of objectives
    f_t with preference lambda and ideal point z*,

        g_mu(x) = mu log sum_t exp(lambda_t (f_t(x) - z*_t) / mu),

    is a smooth upper bound of the Tchebycheff max_t lambda_t (f_t - z*_t) (within mu log T). For deep MTL the
    authors' code applies it to the log-losses normalised by a per-task reference n_t, with z* = 0:

        f_t = log(L_t / n_t),     L = T mu log sum_t exp(lambda_t f_t / mu),

    one backward pass of L. The implied weight of task t (reported) is dL/dL_t = T lambda_t s_t / L_t with
    s = softmax(lambda f / mu): the task furthest above its reference (in log ratio) dominates, and at mu -> 0
    only the worst one is trained. n_t is the task's mean training loss over the last warm-up epoch
    (the authors' "nadir_vector", fixed afterwards). Warm-up (epochs 0 .. warmup_epochs - 1): one backward
    of sum_t log L_t, weights 1/L_t, as in the authors' code; the losses of the last warm-up epoch are
    averaged per task (steps where the task is present) and become n.

    Parameters and defaults (the authors' config, used unchanged for every MTL experiment of the paper, whose
    README commands set neither): mu = 1 (STCH_mu); lambda_t = 1 for every task (their code has no
    preference; `preference` sets relative lambda_t, rescaled to mean 1 so the default is theirs); 5 warm-up
    epochs = their STCH_warmup_epoch = 4 epochs of sum log L plus the epoch (their epoch index 4) whose mean
    losses give n, which also trains on sum log L. With the paper's simplex preference p (sum 1) this is
    T^2 g_mu' with lambda = p, mu' = mu / T, f as above; the factor T keeps the weights' sum T like
    equal weighting.

    `warmup_epochs: 0`: no warm-up; n_t is the task's loss at the first step where it is present, so the
    first STCH step has f = 0 (equal softmax). That rule also covers a task never labelled in the
    measuring epoch: its n_t is taken at its first later present step.

    Deviations from the authors' code: their log(L_t / n_t + 1e-20) and log(L_t + 1e-20) offsets are
    replaced by clamping L_t at the smallest normal float (identical for any loss above 1e-20); their
    subtraction of max_t f_t inside the exponent (a detached constant: the value of L shifts, its gradient
    does not) is the numerically stable logsumexp here, which changes no gradient and gives L its exact
    value. A run of at most `warmup_epochs` epochs trains sum_t log L_t only.

    Absent tasks (L_t == 0, no labelled sample in the batch): left out of the sum (warm-up) or of the
    logsumexp (STCH), with T counting the present tasks only, and reported weight 0; the other tasks are
    weighted as STCH weights them alone. An absent step does not count towards the task's mean. With no
    task present the step back-propagates a zero.

    State (declared, checkpointed): the measuring epoch's per-task loss sums and counts, and n (0 = not
    yet measured). Every rank sees the global batch's loss values, so every rank holds the same n.
    """

    promises = Promises(scaling="update")

    def __init__(self, p: STCHParams, tasks: list[Task]) -> None:
        super().__init__(tasks)
        if not p.mu > 0:
            raise ConfigError(f"balancing.mu: must be > 0, got {p.mu}")
        if isinstance(p.warmup_epochs, bool) or not p.warmup_epochs >= 0:
            raise ConfigError(f"balancing.warmup_epochs: must be an integer >= 0, got {p.warmup_epochs}")
        names = [t.name for t in tasks]
        unknown = sorted(set(p.preference) - set(names))
        if unknown:
            raise ConfigError(f"balancing.preference: unknown task(s) {unknown}; tasks are {names}")
        bad = {k: v for k, v in p.preference.items() if not (float(v) > 0 and float(v) < float("inf"))}
        if bad:
            raise ConfigError(f"balancing.preference: every lambda_t must be finite and > 0, got {bad}")
        self.mu, self.warmup_epochs = float(p.mu), int(p.warmup_epochs)
        pref = torch.tensor([float(p.preference.get(n, 1.0)) for n in names], dtype=torch.float64)
        self.preference = pref / pref.mean()
        f64 = dict(dtype=torch.float64)
        n = len(tasks)
        self.declare_state(loss_sum=torch.zeros(n, **f64), loss_count=torch.zeros(n, **f64),
                           normaliser=torch.zeros(n, **f64))  # 0 = not measured yet

    def objective(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> Objective:
        loss = stack_losses(losses, self.task_names)
        value = loss.detach().to(torch.float64)
        present = value != 0
        tiny = torch.finfo(loss.dtype).tiny
        logs = torch.log(loss.clamp(min=tiny))
        if ctx.epoch < self.warmup_epochs:
            state = {}
            if ctx.epoch == self.warmup_epochs - 1:  # the measuring epoch
                state = {"loss_sum": self.loss_sum + torch.where(present, value, 0.0),
                         "loss_count": self.loss_count + present.to(torch.float64)}
            total = torch.where(present, logs, torch.zeros_like(logs)).sum()
            w = torch.where(present, 1.0 / value.clamp(min=tiny), torch.zeros_like(value))
            return Objective(total, w, state)
        return self.smooth_tchebycheff(loss, logs, value, present)

    def smooth_tchebycheff(self, loss: torch.Tensor, logs: torch.Tensor, value: torch.Tensor,
                           present: torch.Tensor) -> Objective:
        """The STCH step: fixes n where it is not measured yet (mean of the measuring epoch, else this step's loss)."""
        measured = self.loss_count > 0
        mean = self.loss_sum / self.loss_count.clamp(min=1.0)
        normaliser = torch.where(self.normaliser > 0, self.normaliser,
                                 torch.where(measured, mean, torch.where(present, value, 0.0)))
        usable = present & (normaliser > 0)
        state = {"normaliser": normaliser}
        if not bool(usable.any()):
            return Objective(loss.sum() * 0.0, torch.zeros_like(value), state)
        k = usable.sum().to(loss.dtype)
        lam = self.preference.to(device=loss.device, dtype=loss.dtype)
        f = logs - torch.log(torch.where(usable, normaliser, 1.0)).to(loss.dtype)
        z = torch.where(usable, lam * f / self.mu, torch.full_like(f, -torch.inf))
        total = k * self.mu * torch.logsumexp(z, 0)
        s = torch.softmax(z.detach().to(torch.float64), 0)
        tiny = torch.finfo(loss.dtype).tiny
        w = torch.where(usable, k.double() * self.preference.to(s.device) * s / value.clamp(min=tiny), 0.0)
        return Objective(total, w, state)
