"""The balancing interface: `Balancer`, what a method declares about itself, and `build_balancer`.

Each training step the trainer hands a method the per-task losses and a `StepContext` (context.py) and the
method performs the whole backward pass. Methods are nn.Modules, so learnable weights join the optimiser
and the checkpoint. Methods do not implement `backward` themselves: they derive from one of the family
bases, which own the backward pass and call the method's one hook:

    LossWeighting       (loss.py)      objective(losses, ctx) -> Objective: one backward of a scalar
    GramianWeighting    (gradient.py)  solver(G) or weights(G, ctx) -> w, or step(G, ctx) -> (w, next state)
    GradientMethod      (gradient.py)  combine(TaskGradients, ctx) -> Combination (Jacobian aggregators:
                                       GradDrop, DB-MTL; methods with learned weights: GradNorm)

State. A method's tensor state is declared once with `declare_state(name=initial)` (buffers, so it is in
`state_dict` and checkpointed). Hooks read it (`self.name`) but never write it: they return the next state
and the family base commits it after the step. Learned weights are nn.Parameters; a gradient a method
computes for them itself (GradNorm) is returned as `own_grads` and written by the base, never as a side
effect of computing weights. Non-tensor state (DWA's epoch history) goes through `extra_state`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from torch import nn

from ..registry import METHODS, Spec
from ..tasks import Task
from .context import StepContext

State = dict[str, torch.Tensor]

# Cost classes (`Balancer.cost_class`, printed by `mtlvision methods`)
ONE_BACKWARD = "one backward"
GRADIENT_EITHER = "gradient method (feature or parameter space)"
GRADIENT_FEATURE = "gradient method (feature space only)"
GRADIENT_PARAMETER = "gradient method (parameter space only)"
# methods that call `StepContext.run_probe` (context.py): the extra forward/backward passes are part of the class
GRADIENT_TWO_EXTRA_BATCHES = "gradient method (parameter space only) + 2 extra batches"
ONE_BACKWARD_LOOKAHEAD = "one backward + look-ahead (1 validation batch; 3 extra forwards, 2 extra backwards)"


@dataclasses.dataclass(frozen=True)
class Promises:
    """What a method guarantees. tests/test_method_properties.py checks every promise of every registered
    method (in each space it supports), so declare only what holds for any input.

    weighted_sum: the trunk receives exactly ∇_θ Σ_t w_t L_t for the weights `backward` reports (False for
        methods whose update is not a combination of the current task gradients: GradDrop, DB-MTL).
    non_conflicting: the update d never conflicts with a task: d·g_t ≥ 0 for every t.
    permutation: "equivariant": reordering the tasks reorders the weights and leaves the update alone;
        "positional": random draws attach to task positions (the weight vector by position is unchanged);
        "random_order": equivariant when the random task orders are trivial (checked with two tasks).
    scaling: multiplying one task's loss by s > 0 in every step (from a fresh instance, parameters fixed)
        leaves "weights": the reported weights unchanged; "update": the trunk update unchanged;
        "direction": the update unchanged up to a positive factor; "line": up to a non-zero factor;
        "none": nothing promised.
    """

    weighted_sum: bool = True
    non_conflicting: bool = False
    permutation: Literal["equivariant", "positional", "random_order"] = "equivariant"
    scaling: Literal["weights", "update", "direction", "line", "none"] = "none"


class Balancer(nn.Module):
    """Base class. `backward` runs the backward pass and returns the task weights it applied."""

    # Gramian of the last step's per-task gradients (methods that compute one), for telemetry
    gramian: torch.Tensor | None = None
    # True for methods that differentiate each loss with respect to `StepContext.shared`: the
    # trainer then asks the model to split its graph there (`model(x, split=True)`)
    needs_shared_features: bool = False
    # True for methods whose `backward` leaves the shared parameters' gradients already averaged over
    # data-parallel ranks (parameter-space gradient methods average J): the trainer averages the rest
    shared_grads_reduced: bool = False
    # what a step costs, for `mtlvision methods` (one of the constants above, or a longer phrase for
    # methods that draw extra batches, e.g. "gradient method + 2 extra batches")
    cost_class: str = ONE_BACKWARD
    promises: Promises = Promises()
    # True for methods that call `StepContext.run_probe` (extra mini-batches, a look-ahead): a caller that
    # builds its own StepContext must give it a `probe`
    needs_probe: bool = False

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.task_names = [t.name for t in tasks]
        self.state_names: tuple[str, ...] = ()

    # -- the step ---------------------------------------------------------------------------------
    def backward(self, losses: dict[str, torch.Tensor], ctx: StepContext) -> dict[str, float]:
        raise NotImplementedError

    def epoch_end(self, epoch: int, mean_losses: dict[str, float]) -> None:
        """Called after each training epoch with the epoch's mean task losses (e.g. for DWA)."""

    # -- state ------------------------------------------------------------------------------------
    def declare_state(self, **initial: torch.Tensor) -> None:
        """Register tensor state (buffers: moved with `.to`, saved in `state_dict`). A buffer may change
        shape when it is committed (sized on first use); loading a checkpoint takes the saved shape."""
        for name, value in initial.items():
            self.register_buffer(name, value)
        self.state_names = (*self.state_names, *initial)

    def commit(self, state: State) -> None:
        """Make `state` (returned by a hook) the current state. Called by the family bases only.

        The new tensors replace the buffers (no copy); they keep the buffer's dtype and device unless the
        shape changed (state sized on first use takes the new tensor as it is)."""
        for name, value in state.items():
            if name not in self.state_names:
                raise KeyError(f"{type(self).__name__}: undeclared state {name!r}")
            current = getattr(self, name)
            value = value.detach()
            if value.shape == current.shape:
                value = value.to(device=current.device, dtype=current.dtype)
            setattr(self, name, value)

    def write_grads(self, grads: dict[str, torch.Tensor]) -> None:
        """Set the gradients a method computed for its own parameters (by attribute name)."""
        for name, grad in grads.items():
            param = getattr(self, name)
            param.grad = grad.to(param.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        for name in self.state_names:  # state sized on first use: take the checkpoint's shape
            saved = state_dict.get(prefix + name)
            current = getattr(self, name)
            if saved is not None and saved.shape != current.shape:
                setattr(self, name, torch.empty(saved.shape, dtype=saved.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_state(self) -> dict[str, Any]:
        """Non-tensor state to checkpoint (histories, seeds)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        return None


def as_weights(names: list[str], weights: torch.Tensor) -> dict[str, float]:
    """The reported weights: one float per task, in task order."""
    return dict(zip(names, (float(w) for w in weights.detach().cpu().tolist())))


def gradient_stats(gramian: torch.Tensor, names: list[str]) -> dict[str, dict[str, float]]:
    """Per-task gradient norms and pairwise cosine similarities, read off G = J Jᵀ."""
    g = gramian.detach().double().cpu()
    norms = g.diagonal().clamp(min=0).sqrt()
    cos = g / (norms[:, None] * norms[None, :]).clamp(min=1e-30)
    return {"norm": {n: norms[i].item() for i, n in enumerate(names)},
            "cosine": {f"{a}|{b}": cos[i, j].item() for i, a in enumerate(names)
                       for j, b in enumerate(names) if i < j}}


def build_balancer(spec: Spec | dict[str, Any], tasks: list[Task]) -> Balancer:
    """The balancing method a spec (or a mapping with its `method`) describes, for `tasks`."""
    return METHODS.build(METHODS.spec(spec, "balancing"), tasks)
