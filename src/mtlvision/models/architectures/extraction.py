"""Customised gate control (CGC) and progressive layered extraction (PLE) (Tang et al., RecSys 2020): shared
and task-specific experts, one gate per task (and per level); the shared parts are in moe.py."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import Spec
from ...tasks import Task
from ..backbones import Backbone
from ..heads import build_head
from .base import ARCHITECTURES, ModelOutput
from .moe import (WHERE, MixtureOfExperts, SoftmaxGate, at_least, expert_copies, gap, mix, resolve_split,
                  run_experts, shared_bottom)


class _ExtractionLevel(nn.Module):
    """One extraction network: `task_experts` experts per task and `shared_experts` shared ones, a gate
    per task over [its own experts, the shared experts], and (below the last level) a shared gate over
    all experts."""

    def __init__(self, parts: list[nn.Module], in_channels: int, tasks: int, task_experts: int,
                 shared_experts: int, shared_gate: bool) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList([expert_copies(parts, task_experts) for _ in range(tasks)])
        self.shared_experts = expert_copies(parts, shared_experts)
        self.task_gates = nn.ModuleList([SoftmaxGate(in_channels, task_experts + shared_experts)
                                         for _ in range(tasks)])
        self.shared_gate = SoftmaxGate(in_channels, tasks * task_experts + shared_experts) if shared_gate else None

    def tasks(self, inputs: list[torch.Tensor], shared: torch.Tensor,
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per task: its experts' stacked outputs, its gate weights and its mixture g^k = w^k S^k."""
        own = [run_experts(experts, x) for x, experts in zip(inputs, self.task_experts)]
        weights = [gate(gap(x)) for x, gate in zip(inputs, self.task_gates)]
        mixed = [mix(w, torch.cat([o, shared], 1)) for w, o in zip(weights, own)]
        return own, weights, mixed


class _Extraction(MixtureOfExperts):
    """Task-specific and shared experts in `levels` extraction networks: CGC (one level) and PLE."""

    def __init__(self, backbone: Backbone, tasks: list[Task], head: Spec, levels: int, task_experts: int,
                 shared_experts: int, split: Optional[int]) -> None:
        backbone.require_stages(type(self).__name__)
        n = len(backbone.stages)
        if levels > n:
            raise ConfigError(f"{WHERE}.levels: expected at most {n} (one backbone stage per level), got {levels}")
        split = resolve_split(split, n, n - levels)
        if levels > n - split:
            raise ConfigError(f"{WHERE}.levels: expected at most len(stages) - split = {n - split} (one stage "
                              f"per level), got {levels}")
        super().__init__(shared_bottom(backbone, split), tasks)
        q, r = divmod(n - split, levels)  # consecutive stage groups, the first r one stage longer
        bounds = [split + j * q + min(j, r) for j in range(levels + 1)]
        groups = [list(backbone.stages[a:b]) for a, b in zip(bounds, bounds[1:])]
        groups[-1].append(backbone.pool)
        channels = backbone.channels()  # channels[b]: the input channels of stage b
        self.levels = nn.ModuleList([
            _ExtractionLevel(group, channels[b], len(tasks), task_experts, shared_experts,
                             shared_gate=j < levels - 1) for j, (group, b) in enumerate(zip(groups, bounds))])
        self.heads = nn.ModuleList([build_head(head, backbone.out_dim, t.num_classes) for t in tasks])

    def shared_parameters(self) -> list[nn.Parameter]:
        return [*self.backbone.parameters(), *self.levels[:-1].parameters(),
                *self.levels[-1].shared_experts.parameters()]

    def _run(self, x: torch.Tensor, split: bool = False) -> tuple[ModelOutput, dict[str, torch.Tensor]]:
        h = self.backbone(x)
        n_tasks, gates = len(self.task_names), {}
        inputs, shared_in = [h] * n_tasks, h
        for j, level in enumerate(self.levels[:-1], 1):
            shared = run_experts(level.shared_experts, shared_in)
            own, weights, inputs = level.tasks(inputs, shared)
            w_shared = level.shared_gate(gap(shared_in))
            shared_in = mix(w_shared, torch.cat([*own, shared], 1))
            gates.update({f"level{j}/{name}": w for name, w in zip(self.task_names, weights)})
            gates[f"level{j}/(shared)"] = w_shared
        last = self.levels[-1]
        trunk = ((h,) if len(self.levels) == 1 else tuple(inputs)) + (run_experts(last.shared_experts, shared_in),)
        cut = self.cut(*trunk, split=split)
        inputs = [cut[0]] * n_tasks if len(self.levels) == 1 else list(cut[:-1])
        _, weights, mixed = last.tasks(inputs, cut[-1])
        gates.update(zip(self.task_names, weights))
        logits = {name: head(m) for name, head, m in zip(self.task_names, self.heads, mixed)}
        return ModelOutput(logits, cut, trunk), gates


@dataclasses.dataclass
class CGCParams:
    shared_experts: int = 2  # m_s
    task_experts: int = 1  # m_k, per task
    split: Optional[int] = None  # backbone stages in the shared bottom; None: all but the last

    def __post_init__(self) -> None:
        at_least("shared_experts", self.shared_experts, 1)
        at_least("task_experts", self.task_experts, 1)


@ARCHITECTURES.register("cgc", params=CGCParams)
class CGC(_Extraction):
    r"""CGC (Tang et al., RecSys 2020): shared experts plus task-specific ones; each task gates its own and the shared.

        S^k(x) = [E_(k,1), ..., E_(k,m_k), E_(s,1), ..., E_(s,m_s)]     expert outputs on h(x)
        g^k(x) = softmax(W_g^k GAP(h(x))) S^k(x),   y_k = head_k(g^k(x))

    Unlike LibMTL's CGC (whose task experts of one task are one module repeated), every expert here has
    its own parameters.
    """

    def __init__(self, p: CGCParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks, head, 1, p.task_experts, p.shared_experts, p.split)


@dataclasses.dataclass
class PLEParams:
    levels: int = 2  # extraction networks; the backbone stages above `split` are divided among them
    shared_experts: int = 2  # m_s per level
    task_experts: int = 1  # m_k per task and level
    split: Optional[int] = None  # backbone stages in the shared bottom; None: len(stages) - levels

    def __post_init__(self) -> None:
        at_least("levels", self.levels, 1)
        at_least("shared_experts", self.shared_experts, 1)
        at_least("task_experts", self.task_experts, 1)


@ARCHITECTURES.register("ple", params=PLEParams)
class PLE(_Extraction):
    r"""PLE (Tang et al., RecSys 2020): CGC extraction networks stacked, with a shared gate between levels.

        g^{k,j}(x) = w^{k,j}(g^{k,j-1}(x)) S^{k,j}(x)        task k's input to level j+1 (g^{k,0} = h(x))
        g^{s,j}(x) = w^{s,j}(g^{s,j-1}(x)) S^{s,j}(x)        shared input to level j+1, j < L

    w^{·,j}(z) = softmax(W GAP(z)); S^{k,j} stacks task k's and the shared experts of level j (task k's
    read g^{k,j-1}, the shared read g^{s,j-1}); S^{s,j} stacks every expert of level j. The experts of
    level j are copies of the j-th group of consecutive backbone stages above `split` (the last group
    with the pool); the last level is a CGC without shared gate and y_k = head_k(g^{k,L}). LibMTL's
    image PLE has no shared gate (its shared experts read each task's input); this follows the paper.
    """

    def __init__(self, p: PLEParams, backbone: Backbone, tasks: list[Task], head: Spec) -> None:
        super().__init__(backbone, tasks, head, p.levels, p.task_experts, p.shared_experts, p.split)
