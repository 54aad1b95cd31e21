r"""Mixture-of-experts architectures on any registered backbone: MMoE and DSelect-k here, CGC and PLE in
extraction.py, with the parts the four share.

Image design, shared by the four: the backbone's `stem` and first `split` stages form a shared
bottom h(x) (a feature map); every expert is an independently re-initialised copy of the remaining
stages and the `pool` (deep copy, then `reset_parameters()` on each submodule that has one, so no two
experts start equal: PyTorch's default initialisation of each layer, not the backbone's Kaiming fan-out;
zero-init residuals and pretrained weights stay in the bottom only), mapping h(x)
to a vector in R^D (D = backbone.out_dim); a gate reads the global-average-pooled bottom features
GAP(h(x)) in R^C (features, not pixels) and gives one weight per expert; heads read the gated mixture
of expert outputs, in R^D.

Token backbones (vision transformers): a stage is a group of consecutive transformer blocks, so the
shared bottom is the patch and position embedding plus the first `split` groups, h(x) a token sequence
(B, N, C); every expert is a re-initialised copy of the remaining blocks, the final norm and the pooling
(class token or token mean, as the model pools); the gates read the mean token of h(x).

Shared representation (see `Architecture.cut`): everything upstream of the shared tensors is trunk
(`shared_parameters()`): whatever reaches more than one task's loss, and in PLE also the task gates of the
levels below the last, whose outputs are shared tensors; the tensors the trunk hands to task-specific
modules are the shared tensors, which feature-space gradient methods differentiate each loss with respect to.

* MMoE, DSelect-k: trunk = bottom + experts; shared = (GAP(h(x)) (B, C), stacked expert outputs (B, K, D)).
* CGC: trunk = bottom + shared experts; shared = (h(x) (B, C, H, W), stacked shared-expert outputs);
  the task-specific experts read h(x), so they are downstream of the cut.
* PLE with L levels: every level but the last feeds all tasks (its shared gate mixes every expert into
  the next level's shared input), so it is trunk, with the last level's shared experts; shared = (each
  task's input to the last level, T maps (B, C, H, W), stacked last-level shared-expert outputs).
  With one level this is CGC's cut.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, Architecture, ModelOutput

WHERE = "model.architecture"


def at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{WHERE}.{name}: expected an integer >= {low}, got {value}")


def resolve_split(split: Optional[int], n_stages: int, default: int) -> int:
    """Number of backbone stages in the shared bottom: 0 <= split < n_stages (one stage at least is left
    for the experts); None means `default`."""
    split = default if split is None else split
    if not 0 <= split < n_stages:
        raise ConfigError(f"{WHERE}.split: expected 0 <= split <= {n_stages - 1} (the backbone has {n_stages} "
                          f"stages; the experts need one at least), got {split}")
    return split


def shared_bottom(backbone: Backbone, split: int) -> Backbone:
    """The shared bottom: stem + stages[:split], no pool; its `out_dim` is its output channels."""
    bottom = backbone.bottom(split)
    if not any(True for _ in bottom.parameters()):
        raise ConfigError(f"{WHERE}.split: {split} leaves the shared bottom without parameters (this backbone's stem "
                          "has none), so the gates would read raw pixels; use split >= 1")
    return bottom


def _fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every submodule that has `reset_parameters` re-initialised."""
    clone = copy.deepcopy(module)
    for m in clone.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
    return clone


def expert_copies(parts: list[nn.Module], n: int) -> nn.ModuleList:
    """`n` experts, each a fresh copy of the modules `parts` in sequence."""
    return nn.ModuleList([nn.Sequential(*(_fresh_copy(p) for p in parts)) for _ in range(n)])


def run_experts(experts: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Stacked expert outputs (B, n, ...)."""
    return torch.stack([e(x) for e in experts], 1)


def gap(h: torch.Tensor) -> torch.Tensor:
    """Gate input: global average pool of a feature map (B, C, H, W), or mean of a token sequence (B, N, C),
    -> (B, C)."""
    return h.mean((2, 3)) if h.ndim == 4 else h.mean(1)


def mix(weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_i w_i E_i: weights (B, n), experts (B, n, ...) -> (B, ...)."""
    return torch.einsum("bn,bn...->b...", weights.to(experts.dtype), experts)


class SoftmaxGate(nn.Module):
    """w(x) = softmax(W x) over `experts` (MMoE, CGC, PLE; no bias, as in the papers' formulas)."""

    def __init__(self, in_dim: int, experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, experts, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).softmax(-1)


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """S(t) = 0 for t <= -γ/2, 1 for t >= γ/2, -2t³/γ³ + 3t/(2γ) + 1/2 between (exactly 0/1 outside)."""
    poly = (-2 / gamma**3) * t**3 + (3 / (2 * gamma)) * t + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), poly))


class _AddPenalty(torch.autograd.Function):
    """Identity on `x` whose backward also back-propagates the scalar `penalty` with gradient 1."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        ctx.penalty_dtype = penalty.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), dtype=ctx.penalty_dtype, device=grad.device)


class DSelectKGate(nn.Module):
    r"""Per-example DSelect-k gate (Hazimeh et al., NeurIPS 2021) over n = 2^m experts.

    k single-expert selectors; selector i has m = log2(n) binary-code logits z^(i)(x) and picks expert j
    with weight r_j(z^(i)) = Π_l [b_l(j) S(z^(i)_l) + (1 - b_l(j)) (1 - S(z^(i)_l))], b_l(j) the l-th bit of
    j (so Σ_j r_j = 1). The gate is q(x) = Σ_i softmax(α(x))_i r(z^(i)(x)); α(x) and z(x) are linear
    (with bias) in the gate input, initialised as in the authors' code (z: U(±γ/100), α: U(±0.05)).
    Once every S(z) is exactly 0 or 1 each selector is one-hot, so at most k experts have nonzero weight.

    Entropy regulariser (`entropy_reg` = λ > 0, training only): λ · mean_b Σ_i H(r^(i)(x_b)), with
    H(r) = -Σ_j r_j log(r_j + 1e-6), pushes the selectors to one-hot. The trainer's losses come from the
    logits alone, so its gradient is added in the backward pass through the gate's weights: each
    backward of this task's loss adds ∇λH to the gate's own parameters (once per step, as every balancing
    method differentiates each task loss once). It is computed on the detached gate input, so the trunk
    and the gradient methods' Jacobians never see it. GradNorm, which scales task-side gradients by its
    task weights, scales this one too; in multi-input runs the mean runs over every stream's rows. The
    authors' code sums over the batch instead of averaging (their λ is ours divided by the batch size).
    """

    def __init__(self, in_dim: int, experts: int, k: int, gamma: float, entropy_reg: float = 0.0) -> None:
        super().__init__()
        self.k, self.bits, self.gamma, self.entropy_reg = k, experts.bit_length() - 1, gamma, entropy_reg
        self.z = nn.Linear(in_dim, k * self.bits)
        self.alpha = nn.Linear(in_dim, k)
        nn.init.uniform_(self.z.weight, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.z.bias, -gamma / 100, gamma / 100)
        nn.init.uniform_(self.alpha.weight, -0.05, 0.05)
        nn.init.uniform_(self.alpha.bias, -0.05, 0.05)
        codes = (torch.arange(experts)[:, None] >> torch.arange(self.bits)) & 1  # (n, m): bit l of expert j
        self.register_buffer("codes", codes.bool(), persistent=False)

    def selectors(self, x: torch.Tensor) -> torch.Tensor:
        """The single-expert selectors' outputs r (B, k, n), each row summing to one."""
        s = smooth_step(self.z(x).view(-1, self.k, 1, self.bits), self.gamma)
        return torch.where(self.codes, s, 1 - s).prod(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights q (B, n)."""
        weights = torch.einsum("bk,bkn->bn", self.alpha(x).softmax(-1), self.selectors(x))
        if self.entropy_reg > 0 and self.training and torch.is_grad_enabled():
            r = self.selectors(x.detach())
            penalty = -self.entropy_reg * (r * torch.log(r + 1e-6)).sum((1, 2)).mean()
            weights = _AddPenalty.apply(weights, penalty)
        return weights


class MixtureOfExperts(Architecture):
    """Base: forward and `gate_weights` from one `_run`; gate parameters are not weight-decayed."""

    @property
    def no_weight_decay(self) -> frozenset[str]:  # type: ignore[override]
        """Gate parameters: decay would pull softmax gates towards uniform and keep DSelect-k from saturating."""
        return frozenset(f"{name}.{p}" for name, m in self.named_modules()
                         if isinstance(m, (SoftmaxGate, DSelectKGate)) for p, _ in m.named_parameters())

    def _run(self, x: torch.Tensor, split: bool = False) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, split: bool = False) -> ModelOutput:
        return self._run(x, split)[0]

    @torch.no_grad()
    def gate_weights(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each gate's expert weights (B, n_experts) for a batch, keyed by task (PLE adds its lower levels'
        gates as "level{j}/{task}" and "level{j}/(shared)"); every row sums to one.

        Computed in eval mode, as at inference (BatchNorm running statistics, no dropout), so the call
        leaves the model as it was: in train mode the forward pass would update the running statistics."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            return self._run(x)[1]
        finally:
            for m, training in modes:
                m.training = training


class _GatedExperts(MixtureOfExperts):
    """K experts shared by every task, one gate per task on GAP(h(x)): MMoE and DSelect-k."""

    def __init__(self, backbone: Backbone, tasks: list[Task], head: Spec, experts: int, split: Optional[int],
                 gate: Callable[[int], nn.Module]) -> None:
        backbone.require_stages(type(self).__name__)
        split = resolve_split(split, len(backbone.stages), len(backbone.stages) - 1)
        bottom = shared_bottom(backbone, split)
        super().__init__(bottom, tasks)
        self.experts = expert_copies([*backbone.stages[split:], backbone.pool], experts)
        self.gates = nn.ModuleList([gate(bottom.out_dim) for _ in tasks])
        self.heads = nn.ModuleList([build_head(head, backbone.out_dim, t.num_classes) for t in tasks])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.experts.parameters()]

    def _run(self, x: torch.Tensor, split: bool = False) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
        h = self.backbone(x)
        trunk = (gap(h), run_experts(self.experts, h))
        gate_in, experts = self.cut(*trunk, split=split)
        gates = {name: gate(gate_in) for name, gate in zip(self.task_names, self.gates)}
        logits = {name: head(mix(gates[name], experts)) for name, head in zip(self.task_names, self.heads)}
        return ModelOutput(logits, (gate_in, experts), trunk), gates


@dataclasses.dataclass
class MMoEParams:
    experts: int = 4  # K
    split: Optional[int] = None  # backbone stages in the shared bottom; None: all but the last

    def __post_init__(self) -> None:
        at_least("experts", self.experts, 1)


@ARCHITECTURES.register("mmoe", params=MMoEParams)
class MMoE(_GatedExperts):
    r"""MMoE (Ma et al., KDD 2018): K experts shared by all tasks, a softmax gate per task on the features.

        g^t(x) = softmax(W_t GAP(h(x)))                  W_t in R^{K x C}
        y_t    = head_t( Σ_i g^t(x)_i f_i(h(x)) )

    As in the paper, a gate reads what the experts read (here the bottom's features, pooled); LibMTL's
    image version reads the flattened image.
    """

    def __init__(self, p: MMoEParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks, head, p.experts, p.split, lambda c: SoftmaxGate(c, p.experts))


@dataclasses.dataclass
class DSelectKParams:
    experts: int = 4  # n, a power of two (binary codes of log2(n) bits)
    k: int = 2  # single-expert selectors per task: at most k experts per example once converged
    gamma: float = 1.0  # width of the smooth-step's cubic region
    entropy_reg: float = 0.0  # λ of the selectors' entropy regulariser (0: off, the authors' default)
    split: Optional[int] = None  # backbone stages in the shared bottom; None: all but the last

    def __post_init__(self) -> None:
        if self.experts < 2 or self.experts & (self.experts - 1):
            raise ConfigError(f"{WHERE}.experts: DSelect-k needs a power of two >= 2 (2, 4, 8, ...), "
                              f"got {self.experts}")
        if not 1 <= self.k <= self.experts:
            raise ConfigError(f"{WHERE}.k: expected 1 <= k <= experts ({self.experts}), got {self.k}")
        if self.gamma <= 0:
            raise ConfigError(f"{WHERE}.gamma: expected > 0, got {self.gamma}")
        if self.entropy_reg < 0:
            raise ConfigError(f"{WHERE}.entropy_reg: expected >= 0, got {self.entropy_reg}")


@ARCHITECTURES.register("dselect-k", params=DSelectKParams)
class DSelectK(_GatedExperts):
    r"""DSelect-k (Hazimeh et al., NeurIPS 2021): MMoE with a sparse, differentiable per-example gate.

        y_t = head_t( Σ_j q^t(x)_j f_j(h(x)) ),   q^t: `DSelectKGate` on GAP(h(x))

    `entropy_reg` > 0 adds the authors' optional entropy regulariser on the selectors (see `DSelectKGate`):
    without it the smooth-step outputs often reach exactly 0/1 in training, but a nearly converged soft
    mixture has a vanishing gradient and can stall short of it. Left out: the authors' penalty keeping
    selectors off non-existent experts when n is not a power of two (so n must be one).
    """

    def __init__(self, p: DSelectKParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks, head, p.experts, p.split,
                         lambda c: DSelectKGate(c, p.experts, p.k, p.gamma, p.entropy_reg))
