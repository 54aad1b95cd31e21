"""GradNorm (Chen et al., ICML 2018): learned task weights driven by gradient norms read off G."""
from __future__ import annotations

import dataclasses

import torch

from ...tasks import Task
from ..base import METHODS, Promises
from ..context import StepContext
from ..gradient import Combination, GradientMethod, GradientParams, TaskGradients


@dataclasses.dataclass
class GradNormParams(GradientParams):
    alpha: float = 1.5  # asymmetry: how strongly slow tasks are pushed (paper's default range 0.12-3)


@METHODS.register("gradnorm", params=GradNormParams,
                  description="GradNorm: learn task weights so weighted gradient norms follow relative "
                              "training rates (Chen et al., ICML 2018).")
class GradNorm(GradientMethod):
    r"""GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, Algorithm 1).

    Learnable weights w_i (start 1) scale the task losses: the network is trained on Σ_i w_i L_i. With
    n_i = ||∇_W L_i|| read off the Gramian (n_i = sqrt(G_ii); W = the shared representation in feature
    space, the trunk parameters in parameter space; the paper uses the last shared layer),

        G_i = w_i n_i,  Ḡ = mean_i G_i,  L̃_i = L_i(t) / L_i(0),  r_i = L̃_i / mean_j L̃_j
        L_grad = Σ_i | G_i − Ḡ r_i^α |          (the target Ḡ r_i^α is held constant)

    ∂L_grad/∂w_i = sign(G_i − Ḡ r_i^α) n_i becomes w's gradient, which the main optimiser applies
    (the paper uses one optimiser for both); w is renormalised to Σ_i w_i = T before each step.
    L_i(0) is each task's first non-zero loss.

    Where the pieces go: the learned scales are the loss transform L_i -> w_i L_i, applied as the
    combination d = Σ_i w_i ∇L_i of the unscaled task gradients (and w_i ∇L_i for the task-specific
    parameters, `Combination.task_scale`), so G holds the unscaled gradients the norms n_i are read
    from. ∂L_grad/∂w is returned as `Combination.own_grads["w"]` and written by the backward pass. The
    renormalisation of w is a projection of the parameter at the start of `combine`; L_i(0) is the
    declared state `initial`.
    """

    promises = Promises(scaling="weights")

    def __init__(self, p: GradNormParams, tasks: list[Task]) -> None:
        super().__init__(p, tasks)
        self.alpha = p.alpha
        self.w = torch.nn.Parameter(torch.ones(len(tasks)))
        self.declare_state(initial=torch.zeros(len(tasks), dtype=torch.float64))

    def combine(self, grads: TaskGradients, ctx: StepContext) -> Combination:
        with torch.no_grad():
            self.w.clamp_(min=1e-4).mul_(len(self.w) / self.w.sum())
        current = grads.losses
        initial = torch.where((self.initial == 0) & (current > 0), current, self.initial)
        G = grads.gramian
        n = G.detach().double().diagonal().clamp(min=0).sqrt()
        w = self.w.detach().double()
        scaled = w * n
        ratio = torch.where(initial > 0, current / initial.clamp(min=1e-12), torch.ones_like(n))
        target = scaled.mean() * (ratio / ratio.mean()) ** self.alpha
        w = w.to(G.dtype).to(grads.matrix.dtype)
        return Combination(w @ grads.matrix, w, task_scale=w, state={"initial": initial},
                           own_grads={"w": torch.sign(scaled - target) * n})
