"""Where per-task gradients are taken: feature space and parameter space, one interface.

A `GradientSpace` computes the per-task Jacobian J (T x N) of a step's objectives, the Gramian G = J Jᵀ of
the global batch, and applies a combined update d (N,) to the trunk. Gradient methods see only J, G and d,
never which space they run in.

* `feature` (default; "MGDA-UB", Sener & Koltun 2018): J holds each task's gradient with respect to
  the shared representation (B x D; where an architecture's tasks read several trunk tensors, e.g.
  MTAN's stage outputs, their per-example concatenation). The T rows are taken together
  (`feature_rows`): one backward through the task-private modules (heads, losses, per-task attention
  or gates) and, where the architecture has modules several tasks read (task-features' attention), one
  batched backward through them; then ONE backward through the trunk with the combined gradient: close
  to the price of an equal-weight step.
  It balances what the trunk receives through the representation, an upper-bound surrogate of the
  exact parameter-space problem. In multi-input runs every task owns different rows of the
  representation, so cross-task inner products are zero there; use `parameter` to see conflicts.
* `parameter`: J holds each task's gradient with respect to every shared (trunk) parameter: exact,
  at the price of T backward passes through the trunk.

Task-specific parameters (heads, and modules that only task heads read) receive the sum of their own
tasks' gradients (scaled per task where a method asks for it, see `Combination.task_scale`), from one
backward of the objectives restricted to them once the method has combined (`apply_task_grads`).

Data parallel (N ranks, each loss a mean over the rank's rows): in feature space each rank holds its
own rows of the global J, scaled by 1/N, so the global G = Σ_r J_r J_rᵀ / N² is one all_reduce of
the T x T Gramian (`StepContext.all_reduce`); each rank then back-propagates its local combined
gradient and the trainer averages the trunk gradients. In parameter space the global J is the mean of
the ranks' J: it is averaged before G is formed, so the trunk update is already the global one
(`shared_grads_reduced`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from .context import StepContext


@dataclasses.dataclass
class Jacobian:
    """Per-task gradients of one step: the rows of J, and what the task-specific parameters' gradients are
    taken from once the method has said how to scale them (`GradientSpace.apply_task_grads`)."""

    matrix: torch.Tensor  # (T, N); parameter space: averaged over ranks
    task_params: list[nn.Parameter]  # the task-specific parameters that require grad
    objectives: list[torch.Tensor]  # the step's objectives, their graph kept for `apply_task_grads`


class _Graph:
    """The autograd graph between the objectives and the edges of `targets` (the shared tensors), as
    `feature_rows` needs it: which nodes lead to a target, and which objectives reach each of them.

    Python wrappers of autograd nodes are kept in `nodes` so that their ids stay unique while in use.
    A target's node is never entered (below it lies the trunk)."""

    def __init__(self, roots: list[Optional[tuple]], targets: dict[tuple[int, int], int]) -> None:
        self.targets = targets
        self.target_nodes = {node for node, _ in targets}
        self.nodes: dict[int, object] = {}
        self.kids: dict[int, list[tuple[int, object, int]]] = {}  # node -> (edge index, child, output_nr)
        self.reach: dict[int, bool] = {}
        for root in roots:
            if root is not None:
                self._mark_reach(root[0])
        # owner[node]: the one objective reaching it, or MIXED when several do
        self.owner: dict[int, int] = {}
        for t, root in enumerate(roots):
            if root is not None and id(root[0]) not in self.target_nodes and self.leads(root):
                self._own(root[0], t)

    MIXED = -1

    def edge_kind(self, node: object, nr: int) -> Optional[int]:
        return self.targets.get((id(node), nr))

    def leads(self, edge: tuple) -> bool:
        """Whether back-propagating into `edge` (node, output_nr) reaches a target."""
        node, nr = edge
        if id(node) in self.target_nodes:
            return (id(node), nr) in self.targets
        return self.reach.get(id(node), False)

    def _children(self, node: object) -> list[tuple[int, object, int]]:
        i = id(node)
        kids = self.kids.get(i)
        if kids is None:
            self.nodes[i] = node
            kids = [(k, c, nr) for k, (c, nr) in enumerate(node.next_functions) if c is not None]
            self.kids[i] = kids
        return kids

    def _mark_reach(self, root: object) -> None:
        if id(root) in self.target_nodes or id(root) in self.reach:
            return
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            i = id(node)
            if done:
                self.reach[i] = any(self.leads((c, nr)) for _, c, nr in self._children(node))
                continue
            if i in self.reach:
                continue
            self.reach[i] = False  # provisional (the graph is acyclic)
            stack.append((node, True))
            stack.extend((c, False) for _, c, _ in self._children(node)
                         if id(c) not in self.target_nodes and id(c) not in self.reach)

    def _own(self, root: object, t: int) -> None:
        stack = [root]
        while stack:
            node = stack.pop()
            i = id(node)
            current = self.owner.get(i)
            if current == t or current == self.MIXED:
                continue
            self.owner[i] = t if current is None else self.MIXED
            stack.extend(c for _, c, nr in self.kids[i]
                         if id(c) not in self.target_nodes and self.reach.get(id(c), False))
            if current is not None:  # everything below a mixed node is mixed: mark it once
                self._spread_mixed(node)

    def _spread_mixed(self, node: object) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            for _, c, _ in self.kids[id(n)]:
                j = id(c)
                if j not in self.target_nodes and self.reach.get(j, False) and self.owner.get(j) != self.MIXED:
                    self.owner[j] = self.MIXED
                    stack.append(c)


def _edge(t: torch.Tensor) -> tuple[object, int]:
    """(autograd node, output number) that back-propagation into `t` enters."""
    edge = get_gradient_edge(t)
    return edge.node, edge.output_nr


def task_parameters(ctx: StepContext) -> list[nn.Parameter]:
    return [p for p in ctx.task_params if p.requires_grad]


# Upper bound on the stacked per-task gradients handed to one batched backward through the mixed region
# (tasks are taken in chunks beyond it)
BATCH_BYTES = 256 * 2**20


def feature_rows(objectives: list[torch.Tensor], shared: list[torch.Tensor]) -> list[torch.Tensor]:
    """∂objective_t/∂s for every objective t and shared tensor s, as one (T, *s.shape) tensor per s (zeros
    where unused), without T separate backward passes.

    The graph between the objectives and the shared tensors is split by ownership. Nodes that only one
    objective reaches (its head, its loss, its own attention or gate) are task-private: ONE backward of
    Σ_t objective_t runs through all of them, and a hook on each private node reads what it sends into a
    shared tensor or into the region that several objectives reach ("mixed": e.g. an attention that mixes
    every task's features) — exactly objective t's gradient there, since nothing else flows through a node
    that only objective t reaches. The mixed region, if there is one, is then traversed once for all
    objectives by a batched vector-Jacobian product (`is_grads_batched`, vmap over tasks) from the
    gradients collected at its entry edges. Hard sharing, MTAN, cross-stitch and the mixture-of-experts
    architectures have no mixed region: their rows cost one backward through the task-specific modules.
    (Where a task reads a shared tensor both directly and through the mixed region, the first backward also
    crosses the mixed region once, with the summed gradient: autograd cannot reach the one without the
    other.)

    The shared tensors must be leaves (the split graph `Architecture.cut` makes), or tensors none of which
    is computed from another: a target's node is never entered, so gradients are taken directly at each.
    """
    T = len(objectives)
    targets: dict[tuple[int, int], int] = {}
    keep = []
    for k, s in enumerate(shared):
        if s.requires_grad:
            node, nr = _edge(s)
            keep.append(node)
            targets[(id(node), nr)] = k
    rows = [torch.zeros((T, *s.shape), dtype=s.dtype, device=s.device) for s in shared]
    roots = [_edge(o) if o.requires_grad else None for o in objectives]
    graph = _Graph(roots, targets)
    MIXED = _Graph.MIXED

    # the frontier: edges out of private nodes into a target or into the mixed region
    direct: dict[int, list[tuple[int, int, int]]] = {}  # private node -> (edge index, task, target)
    into_mixed: dict[int, list[tuple[int, int, tuple[int, int]]]] = {}  # node -> (edge index, task, mixed edge)
    mixed_edges: dict[tuple[int, int], object] = {}  # (node id, output_nr) -> GradientEdge
    for i, t in graph.owner.items():
        if t == MIXED:
            continue
        for k, child, nr in graph.kids[i]:
            target = graph.edge_kind(child, nr)
            if target is not None:
                direct.setdefault(i, []).append((k, t, target))
            elif graph.owner.get(id(child)) == MIXED:
                key = (id(child), nr)
                mixed_edges.setdefault(key, GradientEdge(child, nr))
                into_mixed.setdefault(i, []).append((k, t, key))
    # objectives whose own top node is already mixed (the same tensor for two tasks, ...) enter there with 1
    seeds: dict[tuple[int, int], dict[int, torch.Tensor]] = {}
    for t, root in enumerate(roots):
        if root is not None and graph.owner.get(id(root[0])) == MIXED:
            key = (id(root[0]), root[1])
            mixed_edges.setdefault(key, GradientEdge(root[0], root[1]))
            seeds.setdefault(key, {})[t] = torch.ones_like(objectives[t])

    if direct or into_mixed:
        private = [t for t, r in enumerate(roots) if r is not None and graph.owner.get(id(r[0]), MIXED) != MIXED]
        collected: dict[tuple[int, int], dict[int, torch.Tensor]] = seeds

        def hook_for(i: int):
            def hook(grad_inputs, _grad_outputs):
                for k, t, target in direct.get(i, ()):
                    if grad_inputs[k] is not None:
                        rows[target][t] += grad_inputs[k]
                for k, t, key in into_mixed.get(i, ()):
                    g = grad_inputs[k]
                    if g is not None:
                        got = collected.setdefault(key, {})
                        got[t] = got[t] + g if t in got else g
            return hook

        handles = [graph.nodes[i].register_hook(hook_for(i)) for i in {*direct, *into_mixed}]
        inputs = [shared[k] for k in sorted({target for v in direct.values() for _, _, target in v})]
        inputs += [mixed_edges[key] for key in dict.fromkeys(key for v in into_mixed.values() for _, _, key in v)]
        try:
            torch.autograd.grad([objectives[t] for t in private], inputs,
                                [torch.ones_like(objectives[t]) for t in private], retain_graph=True,
                                allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    else:
        collected = seeds

    if collected:
        keys = list(collected)
        tasks = sorted({t for got in collected.values() for t in got})
        firsts = [next(iter(collected[key].values())) for key in keys]
        per_task = sum(g.numel() * g.element_size() for g in firsts)  # bytes of one task's cotangents
        chunk = max(1, min(len(tasks), BATCH_BYTES // max(per_task, 1)))
        wrt = [s for s in shared if s.requires_grad]
        for c in range(0, len(tasks), chunk):
            part = tasks[c:c + chunk]
            cotangents = []
            for key in keys:
                got = collected[key]
                like = next(iter(got.values()))
                cotangents.append(torch.stack([got[t] if t in got else torch.zeros_like(like) for t in part]))
            grads = torch.autograd.grad([mixed_edges[key] for key in keys], wrt, cotangents, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            index = torch.tensor(part, device=rows[0].device) if rows else None
            for k, g in zip((k for k, s in enumerate(shared) if s.requires_grad), grads):
                if g is not None:
                    rows[k].index_add_(0, index, g.to(rows[k].dtype))
    return rows


class GradientSpace:
    """Interface: `jacobian`, `gramian`, `apply`; plus what the trainer must know about the space."""

    name: str
    needs_shared_features: bool  # the model must split its graph at the shared tensors
    shared_grads_reduced: bool  # `apply` leaves the trunk gradients averaged over ranks already

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        raise NotImplementedError

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """G = J Jᵀ of the global batch."""
        raise NotImplementedError

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        """Give the trunk the combined update d (N,)."""
        raise NotImplementedError

    @staticmethod
    def apply_task_grads(jac: Jacobian, scale: Optional[torch.Tensor]) -> None:
        """Task-specific parameters receive Σ_t s_t ∂objective_t/∂θ_task (s = 1 when `scale` is None): one
        backward of the objectives with output gradients s_t, restricted to those parameters. It frees the
        step's graph."""
        used = [t for t, o in enumerate(jac.objectives) if o.requires_grad]
        if not jac.task_params or not used:
            return
        objectives = [jac.objectives[t] for t in used]
        seeds = [torch.ones_like(o) if scale is None else torch.full_like(o, float(scale[t]))
                 for t, o in zip(used, objectives)]
        torch.autograd.backward(objectives, seeds, inputs=jac.task_params)


class FeatureSpace(GradientSpace):
    name = "feature"
    needs_shared_features = True
    shared_grads_reduced = False

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        shared = list(ctx.shared)
        rows = feature_rows(objectives, shared)
        T = len(objectives)
        matrix = torch.cat([r.reshape(T, len(s), -1) for r, s in zip(rows, shared)], 2).reshape(T, -1)
        return Jacobian(matrix.float(), task_parameters(ctx), objectives)

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gramian = ctx.all_reduce(matrix @ matrix.T)
        if ctx.world_size > 1:
            gramian = gramian / ctx.world_size ** 2
        return gramian

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        shared = ctx.shared
        parts = update.view(len(shared[0]), -1).split([s[0].numel() for s in shared], 1)
        torch.autograd.backward(list(ctx.trunk), [u.reshape(s.shape).to(s.dtype) for u, s in zip(parts, ctx.trunk)])


class ParameterSpace(GradientSpace):
    name = "parameter"
    needs_shared_features = False
    shared_grads_reduced = True

    def jacobian(self, objectives: list[torch.Tensor], ctx: StepContext) -> Jacobian:
        shared_params = [p for p in ctx.shared_params if p.requires_grad]
        rows = []
        for objective in objectives:  # T backward passes through the trunk: the price of this space
            grads = (torch.autograd.grad(objective, shared_params, allow_unused=True, retain_graph=True)
                     if objective.requires_grad else [None] * len(shared_params))
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                   for p, g in zip(shared_params, grads)]))
        return Jacobian(ctx.mean_over_ranks(torch.stack(rows)), task_parameters(ctx), objectives)

    def gramian(self, matrix: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        return matrix @ matrix.T  # J is the rank average already

    def apply(self, update: torch.Tensor, ctx: StepContext) -> None:
        offset = 0
        for p in (p for p in ctx.shared_params if p.requires_grad):
            n = p.numel()
            p.grad = update[offset:offset + n].view_as(p).to(p.dtype)
            offset += n


SPACES: dict[str, GradientSpace] = {"feature": FeatureSpace(), "parameter": ParameterSpace()}
