"""What a balancing method may use in one step: `StepContext`, and the probe for extra forward passes.

Probes (extra mini-batches, look-ahead steps). Some methods need more than the step's own forward pass:
MoDo and SDMGrad draw further training batches, Auto-Lambda evaluates a validation batch at parameters
moved by a virtual step. They call `ctx.run_probe(batch, index, shift)`; the trainer provides it as the
`probe` callable, the same for every method (no method-specific branch in the loop):

    probe(batch="train", index=1, shift=None) -> Probe(losses, ctx)

* `batch="train", index=k`: the k-th extra training mini-batch of this step (k ≥ 1), as many rows as the
  step's own batch and augmented alike, its rows drawn with keyed randomness from (seed, stream, epoch,
  step, k), so a run, its rerun and a resumed run see the same extra batches; under data parallelism each
  rank takes its slice of the same global extra batch, as for the step's own. `index=0` is the step's own
  batch again (a second forward, e.g. at shifted parameters).
* `batch="val", index=k`: the k-th validation mini-batch of this step (k ≥ 0), drawn likewise from the
  run's validation split, without augmentation.
* `shift`: {parameter: δ}. The forward uses θ + δ for those parameters (`torch.func.functional_call`: the
  parameters themselves are not modified, so the step's own graph stays valid), and its losses are
  differentiable with respect to θ and δ: a look-ahead θ' = θ − α ∇L is `shift={p: -α g_p}`, second order
  when g was taken with `create_graph=True`, first order when it is detached.
* The probe forward runs in the model's current mode and autocast, never updates BatchNorm running
  statistics (buffers are passed as copies) and draws dropout from the global RNG after the main forward.
* `Probe.losses`: the task losses, global-batch values with local gradients under data parallelism (as the
  step's own, through `Distributed.global_losses`); `Probe.ctx`: a StepContext for that forward (its own
  `shared`/`trunk`, split like the step's own when the method `needs_shared_features`; the same parameter
  lists, step, epoch, all_reduce and world_size; no probe: probes do not nest). A method may take per-task
  gradients on it with the same `GradientSpace.jacobian`. Information a method only reads from a probe
  must be taken with `torch.autograd.grad`: what reaches `.grad` of the model's parameters is the update.

Cost: each probe is one forward (plus any backward the method takes through it); a method that probes
says so in its `cost_class`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Mapping, Optional, Protocol

import torch
from torch import nn

from ..errors import MTLVisionError


@dataclasses.dataclass
class Probe:
    """An extra forward pass the trainer ran for a method: its task losses and its StepContext."""

    losses: dict[str, torch.Tensor]
    ctx: "StepContext"


class ProbeFn(Protocol):
    def __call__(self, batch: Literal["train", "val"] = "train", index: int = 1,
                 shift: Optional[Mapping[nn.Parameter, torch.Tensor]] = None) -> Probe: ...


@dataclasses.dataclass
class StepContext:
    """What a method may use in one step.

    `shared` holds the tensors the task-specific modules read from the trunk (one for hard sharing;
    several for architectures such as MTAN that branch at every stage), each with the batch first.
    `trunk` holds the same tensors on the trunk's side of the cut (they differ when the model split
    the graph there, `model(x, split=True)`); back-propagating into `trunk` reaches every shared
    parameter exactly once.

    `task_jacobian` is the model's `ModelOutput.task_jacobian` when it offers one (only when split):
    objectives (one per task) -> the feature-space J, exactly what one autograd call per task gives
    (`FeatureSpace.jacobian` uses it), valid for objectives that read the shared tensors through their own
    task's logits only. None: not offered.
    """

    shared: tuple[torch.Tensor, ...]
    shared_params: list[nn.Parameter]
    task_params: list[nn.Parameter]
    step: int
    epoch: int
    # Sums a tensor across data-parallel ranks (identity on one process): methods that need
    # cross-rank statistics (e.g. a task Gramian) call it so every rank computes the same weights.
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    trunk: Optional[tuple[torch.Tensor, ...]] = None  # None: the same tensors as `shared`
    world_size: int = 1  # data-parallel ranks `all_reduce` sums over
    probe: Optional[ProbeFn] = None  # extra forward passes (module docstring); None: not provided
    task_jacobian: Optional[Callable[[list[torch.Tensor]], torch.Tensor]] = None  # see the class docstring

    def __post_init__(self) -> None:
        if isinstance(self.shared, torch.Tensor):
            self.shared = (self.shared,)
        if self.trunk is None:
            self.trunk = self.shared
        elif isinstance(self.trunk, torch.Tensor):
            self.trunk = (self.trunk,)

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """`t` averaged across data-parallel ranks (`t` itself on one process)."""
        return t if self.world_size == 1 else self.all_reduce(t) / self.world_size

    def shared_matrix(self) -> torch.Tensor:
        """The shared tensors, detached, as one (B, D) matrix (each flattened per example)."""
        return torch.cat([s.detach().reshape(len(s), -1) for s in self.shared], 1)

    def run_probe(self, batch: Literal["train", "val"] = "train", index: int = 1,
                  shift: Optional[Mapping[nn.Parameter, torch.Tensor]] = None) -> Probe:
        """Another forward pass: an extra batch and/or shifted parameters (see the module docstring)."""
        if self.probe is None:
            raise MTLVisionError("this balancing method needs extra forward passes (StepContext.probe), "
                                 "which the caller did not provide")
        return self.probe(batch, index, shift)
