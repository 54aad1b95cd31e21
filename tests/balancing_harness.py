"""A float64 toy problem that drives any balancing method as the trainer does, for the property suite.

`Net`: a tanh trunk and one linear head per task. `Run.step` builds the StepContext the trainer builds
(graph split at the shared tensor for methods that need shared features), calls `backward`, and under
simulated data parallelism gives the method the global loss values and averages the gradients with the
trainer's own `Distributed` (its collectives run across threads here instead of processes). A probe
(extra batches, shifted parameters) is provided as the trainer is to provide it (balancing/context.py).
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from mtlvision.balancing import METHODS, Probe, StepContext, build_balancer
from mtlvision.tasks import Task
from mtlvision.training.distributed import Distributed

F64 = torch.float64
TASKS = [Task("a", ["0", "1", "2"]), Task("b", ["x", "y"]), Task("c", ["p", "q", "r", "s"])]
IN, WIDTH, ROWS = 6, 5, 8
# parameters a method needs in the suite beyond its defaults (so that the property is not trivial)
PARAMS: dict[str, dict[str, Any]] = {"fixed": {"weights": {"a": 0.5, "c": 2.0}},
                                    "stch": {"warmup_epochs": 1},  # STCH: warm-up, then its own steps
                                    # steps large enough that the weights move visibly on the toy problem
                                    "modo": {"gamma": 0.5}, "auto_lambda": {"lr": 0.01}}


def cases() -> list[tuple[str, Optional[str]]]:
    """Every registered method, in every space it supports (None: a method without spaces)."""
    out = []
    for entry in METHODS.entries():
        spaces = getattr(entry.factory, "spaces", None)
        out += [(entry.name, s) for s in spaces] if spaces else [(entry.name, None)]
    return out


def spec_for(name: str, space: Optional[str]) -> dict[str, Any]:
    params = METHODS.get(name).params
    takes_space = params is not None and "space" in {f.name for f in dataclasses.fields(params)}
    return {"method": name, **({"space": space} if takes_space else {}), **PARAMS.get(name, {})}


def make(name: str, space: Optional[str], tasks: list[Task] = TASKS, seed: int = 0):
    torch.manual_seed(seed)  # methods whose seed defaults to the torch seed
    return build_balancer(spec_for(name, space), tasks)


class Net(nn.Module):
    def __init__(self, tasks: list[Task] = TASKS, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(IN, WIDTH).double()
        self.heads = nn.ModuleDict({t.name: nn.Linear(WIDTH, t.num_classes).double() for t in tasks})

    def forward(self, x: torch.Tensor, split: bool = False):
        trunk = torch.tanh(self.trunk(x))
        shared = trunk.detach().requires_grad_() if split else trunk
        return shared, trunk, {k: m(shared) for k, m in self.heads.items()}

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.trunk.parameters())

    def task_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())


def batch(epoch: int, step: int, tasks: list[Task] = TASKS, rows: int = ROWS, extra: int = 0):
    g = torch.Generator().manual_seed(1000 * epoch + 10 * step + extra)
    x = torch.randn(rows, IN, generator=g, dtype=F64)
    by_name = sorted(tasks, key=lambda t: t.name)  # the same batch whatever the order of the tasks
    return x, {t.name: torch.randint(0, t.num_classes, (rows,), generator=g) for t in by_name}


def losses_of(logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor], tasks: list[Task],
              scale: dict[str, float]) -> dict[str, torch.Tensor]:
    return {t.name: F.cross_entropy(logits[t.name], y[t.name]) * scale.get(t.name, 1.0) for t in tasks}


class ThreadGroup:
    """All-reduce across threads: every rank gets the same sum (taken in rank order)."""

    def __init__(self, n: int) -> None:
        self.n, self.slots = n, [None] * n
        self.barrier = threading.Barrier(n, timeout=120)

    def sum_(self, rank: int, t: torch.Tensor) -> None:
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        total = self.slots[0].clone()
        for s in self.slots[1:]:
            total += s
        self.barrier.wait()
        t.copy_(total)


class ThreadDistributed(Distributed):
    """The trainer's Distributed with its one collective (`_sum_`) run across threads."""

    def __init__(self, rank: int, group: ThreadGroup) -> None:
        super().__init__(rank, group.n)
        self.group = group

    def _sum_(self, t: torch.Tensor) -> None:
        self.group.sum_(self.rank, t)


@dataclasses.dataclass
class Step:
    weights: dict[str, float]
    grads: dict[str, torch.Tensor]  # every model parameter's .grad after the step (and averaging)
    losses: dict[str, float]
    gramian: Optional[torch.Tensor]


class Run:
    """One method on one model: `step` does what `Trainer.step_on` does up to the optimiser step."""

    def __init__(self, balancer, model: Optional[Net] = None, tasks: list[Task] = TASKS,
                 dist: Optional[Distributed] = None, scale: Optional[dict[str, float]] = None,
                 learn: float = 0.0) -> None:
        self.balancer, self.model, self.tasks = balancer, model or Net(tasks), tasks
        self.dist, self.scale, self.learn = dist, scale or {}, learn
        self.rows = slice(None)

    def forward(self, x: torch.Tensor, y: dict[str, torch.Tensor], params: Optional[dict] = None):
        split = self.balancer.needs_shared_features
        if params is None:
            shared, trunk, logits = self.model(x, split)
        else:
            shared, trunk, logits = torch.func.functional_call(self.model, params, (x,), {"split": split})
        losses = losses_of(logits, {k: v[self.rows] for k, v in y.items()}, self.tasks, self.scale)
        if self.dist is not None and self.dist.active:
            counts = {t.name: torch.tensor(len(x)) for t in self.tasks}
            losses = self.dist.global_losses(losses, counts)
        return shared, trunk, losses

    def context(self, shared, trunk, epoch: int, step: int, probe=None) -> StepContext:
        d = self.dist
        return StepContext(shared, self.model.shared_parameters(), self.model.task_parameters(), step, epoch,
                           trunk=trunk, all_reduce=d.all_reduce if d else (lambda t: t),
                           world_size=d.world_size if d else 1, probe=probe)

    def probe(self, epoch: int, step: int) -> Callable[..., Probe]:
        """The trainer's probe: keyed extra batches (this rank's rows) and shifted parameters."""
        def run(kind: str = "train", index: int = 1, shift: Optional[dict] = None) -> Probe:
            x, y = batch(epoch, step, self.tasks, extra=index + (500 if kind == "val" else 0))
            x = x[self.rows]
            named = dict(self.model.named_parameters())
            shift = {id(p): d for p, d in (shift or {}).items()}
            params = {n: p + shift[id(p)] if id(p) in shift else p for n, p in named.items()}
            shared, trunk, losses = self.forward(x, y, params)
            return Probe(losses, self.context(shared, trunk, epoch, step))
        return run

    def step(self, epoch: int, step: int) -> Step:
        x, y = batch(epoch, step, self.tasks)
        for p in [*self.model.parameters(), *self.balancer.parameters()]:
            p.grad = None
        shared, trunk, losses = self.forward(x[self.rows], y)
        ctx = self.context(shared, trunk, epoch, step, self.probe(epoch, step))
        weights = self.balancer.backward(losses, ctx)
        if self.dist is not None:
            b = self.balancer
            self.dist.average_gradients([*self.model.task_parameters(), *b.parameters(),
                                         *([] if b.shared_grads_reduced else self.model.shared_parameters())])
        if self.learn:
            with torch.no_grad():
                for p in self.balancer.parameters():
                    if p.grad is not None:
                        p -= self.learn * p.grad
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        gramian = None if self.balancer.gramian is None else self.balancer.gramian.clone()
        return Step(weights, grads, {k: float(v.detach()) for k, v in losses.items()}, gramian)

    def epoch(self, epoch: int, steps: int) -> list[Step]:
        out = [self.step(epoch, s) for s in range(steps)]
        self.balancer.epoch_end(epoch, {n: sum(o.losses[n] for o in out) / steps for n in out[0].losses})
        return out

    def trajectory(self, epochs: int = 3, steps: int = 2) -> list[Step]:
        return [s for e in range(epochs) for s in self.epoch(e, steps)]


def ranks(name: str, space: Optional[str], world: int = 2, **run_kw) -> list[list[Step]]:
    """The trajectory on `world` simulated ranks, each with its slice of every batch."""
    group = ThreadGroup(world)
    runs = []
    for r in range(world):
        run = Run(make(name, space), dist=ThreadDistributed(r, group), **run_kw)
        per = ROWS // world
        run.rows = slice(r * per, (r + 1) * per)
        runs.append(run)
    results: list[Any] = [None] * world

    def work(r: int) -> None:
        try:
            results[r] = runs[r].trajectory()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            results[r] = exc
            group.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for res in results:
        if isinstance(res, BaseException):
            raise res
    return results
