r"""Task affinity (TAG: Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task Groupings for
Multi-Task Learning", NeurIPS 2021) measured while a multi-task model trains, and task groupings from it.

Every `every` steps, on the training batch X^t, for each task i a lookahead SGD step on the shared
parameters with task i's gradient alone (eq. 1) and the relative change of every task j's loss (eq. 2):

    θ_s|i = θ_s − η ∇_{θ_s} L_i(X^t)              η: the optimiser's current learning rate
    Z^t_{i→j} = 1 − L_j(X^t; θ_s|i, θ_j) / L_j(X^t; θ_s, θ_j)

Z^t > 0: a step on task i also lowers task j's loss. The affinity Z_{i→j} is the mean of Z^t over the
measured steps. Task-specific parameters are not moved by the lookahead; BatchNorm running statistics
touched by the lookahead forwards are restored, so training is exactly the run without measurement.

Grouping (the paper's network selection): choose at most `budget` groups (networks), each a set of tasks,
so that every task is in at least one group, maximising Σ_j max_{G ∋ j} A(G, j), where the affinity onto
j in G is the mean of Z_{i→j} over the other members i of G (0 for a task alone). A task may sit in more
than one group (as a helper); each task is served by the group that helps it most. Solved exactly by
exhaustive search over groups with pruning (fine for up to ~10 tasks and small budgets).
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import Config, as_config
from .errors import ConfigError, MTLVisionError
from .storage import write_json
from .training.trainer import Trainer, load_checkpoint


class AffinityTrainer(Trainer):
    """A Trainer that also measures the lookahead affinity every `every` steps (and otherwise trains as usual)."""

    def __init__(self, cfg: Config, out_dir: str | os.PathLike, every: int = 10, resume: bool = False,
                 quiet: bool = False) -> None:
        super().__init__(cfg, out_dir, resume=resume, quiet=quiet)
        if self.dist.active:
            raise MTLVisionError("affinity: run it in one process (not under torchrun)")
        if every < 1:
            raise ConfigError(f"affinity --every: expected >= 1, got {every}")
        self.every = every
        self.per_epoch: dict[int, np.ndarray] = {}  # epoch -> sum of the measured Z^t
        self.counts: dict[int, int] = {}  # epoch -> number of measurements

    def train_step(self, epoch: int, step: int) -> tuple[Any, ...]:
        x, labels, rows = self.next_batch(epoch, step)
        if step % self.every == 0:
            z = lookahead_affinity(self, x, labels, rows)
            self.per_epoch[epoch] = self.per_epoch.get(epoch, 0) + z
            self.counts[epoch] = self.counts.get(epoch, 0) + 1
        losses, logits, weights = self.step_on(x, labels, rows, epoch, step)
        return losses, logits, labels, weights, len(x)

    def _state(self, epoch: int, wall: float) -> dict[str, Any]:
        state = super()._state(epoch, wall)
        state["affinity"] = {"every": self.every, "per_epoch": {e: z.tolist() for e, z in self.per_epoch.items()},
                             "counts": dict(self.counts)}
        return state

    def _restore(self) -> None:
        super()._restore()
        saved = load_checkpoint(self.out / "checkpoint.pt").get("affinity")
        if saved is None or saved["every"] != self.every:
            raise MTLVisionError(f"{self.out}: the checkpoint holds no affinity measurements taken every "
                                 f"{self.every} steps; measure into a new --out")
        self.per_epoch = {int(e): np.asarray(z) for e, z in saved["per_epoch"].items()}
        self.counts = {int(e): n for e, n in saved["counts"].items()}

    def matrix(self) -> np.ndarray:
        total = sum(self.per_epoch.values())
        return total / max(1, sum(self.counts.values()))


def lookahead_affinity(trainer: Trainer, x: torch.Tensor, labels: dict[str, torch.Tensor],
                       rows: dict[str, slice]) -> np.ndarray:
    """Z^t (T x T, row i = the task whose gradient steps, column j = the task whose loss changes)."""
    model, tasks = trainer.model, trainer.tasks
    params = [p for p in trainer._shared_params if p.requires_grad]
    lr = trainer.optimizer.param_groups[0]["lr"]
    buffers = [b.detach().clone() for b in model.buffers()]

    def task_losses() -> torch.Tensor:
        with trainer.autocast():
            out = model(x)
        return torch.stack([t.loss(out.logits[t.name][rows[t.name]].float(), labels[t.name]) for t in tasks])

    devices = [trainer.device] if trainer.device.type == "cuda" else []
    split, model.split_shared = model.split_shared, False  # the losses must reach the trunk's parameters
    try:
        with torch.random.fork_rng(devices=devices):  # dropout draws here must not shift training's stream
            base = task_losses()
            grads = [torch.autograd.grad(base[i], params, retain_graph=i < len(tasks) - 1, allow_unused=True)
                     for i in range(len(tasks))]
            return _lookahead(base.detach(), grads, params, lr, buffers, model, task_losses)
    finally:
        model.split_shared = split


def _lookahead(base: torch.Tensor, grads: list, params: list[torch.nn.Parameter], lr: float,
               buffers: list[torch.Tensor], model: torch.nn.Module, task_losses: Any) -> np.ndarray:
    """Row i: relative loss changes after the step on task i's gradient; parameters and buffers restored."""
    saved = [p.detach().clone() for p in params]
    z = np.zeros((len(base), len(base)))
    with torch.no_grad():
        for i, g in enumerate(grads):
            for p, gi in zip(params, g):
                if gi is not None:
                    p.sub_(lr * gi)
            after = task_losses()
            z[i] = (1 - after / base).double().cpu().numpy()
            for p, s in zip(params, saved):
                p.copy_(s)
        for b, s in zip(model.buffers(), buffers):
            b.copy_(s)
    return z


def _group_scores(z: np.ndarray) -> dict[tuple[int, ...], np.ndarray]:
    """For every non-empty group G: the affinity onto each task j in G (NaN for tasks outside G)."""
    t = len(z)
    scores = {}
    for size in range(1, t + 1):
        for g in itertools.combinations(range(t), size):
            s = np.full(t, np.nan)
            for j in g:
                others = [i for i in g if i != j]
                s[j] = float(np.mean([z[i, j] for i in others])) if others else 0.0
            scores[g] = s
    return scores


def best_grouping(z: np.ndarray, budget: int) -> tuple[list[tuple[int, ...]], float]:
    """The ≤ `budget` groups covering every task that maximise the total affinity each task receives."""
    t = len(z)
    if not 1 <= budget <= t:
        raise ConfigError(f"affinity --budget: expected 1..{t} (the number of tasks), got {budget}")
    if t > 12:
        raise MTLVisionError(f"affinity grouping: exhaustive search is limited to 12 tasks, got {t}")
    scores = _group_scores(z)
    groups = sorted(scores, key=lambda g: -np.nansum(scores[g]))
    table = np.stack([scores[g] for g in groups])  # (groups, T), NaN where a task is not in the group
    # suffix[k][j]: the most task j can receive from groups[k:] (bounds what the search can still add)
    suffix = np.full((len(groups) + 1, t), -np.inf)
    for k in range(len(groups) - 1, -1, -1):
        suffix[k] = np.fmax(suffix[k + 1], table[k])
    best: tuple[float, list[tuple[int, ...]]] = (-np.inf, [])

    def search(start: int, chosen: list[tuple[int, ...]], served: np.ndarray) -> None:
        nonlocal best
        if np.isfinite(served).all() and served.sum() > best[0]:
            best = (float(served.sum()), list(chosen))
        if len(chosen) == budget:
            return
        for k in range(start, len(groups)):
            new = np.fmax(served, table[k])
            if np.maximum(new, suffix[k + 1]).sum() <= best[0]:
                continue  # even the best remaining groups cannot beat the best grouping found
            search(k + 1, chosen + [groups[k]], new)

    search(0, [], np.full(t, -np.inf))
    return best[1], best[0]


def run_affinity(config: Config | dict | str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                 every: int = 10, budgets: Optional[list[int]] = None, resume: bool = False,
                 quiet: bool = False) -> dict[str, Any]:
    """Train the config while measuring affinity; write affinity.json and affinity.png; return the result."""
    cfg = as_config(config)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{cfg.name}-affinity"
    trainer = AffinityTrainer(cfg, out, every=every, resume=resume, quiet=quiet)
    trainer.fit()
    names = [t.name for t in trainer.tasks]
    z = trainer.matrix()
    budgets = budgets or list(range(1, len(names) + 1))
    groupings = []
    for b in budgets:
        groups, score = best_grouping(z, b)
        groupings.append({"budget": b, "groups": [[names[i] for i in g] for g in groups], "score": score})
    result = {
        "tasks": names, "every": every, "measurements": int(sum(trainer.counts.values())),
        "affinity": z.tolist(),
        "per_epoch": {str(e): (trainer.per_epoch[e] / trainer.counts[e]).tolist() for e in sorted(trainer.counts)},
        "groupings": groupings,
        "note": "affinity[i][j] = mean over measured steps of 1 - L_j(after a lookahead step on task i) / L_j",
    }
    write_json(out / "affinity.json", result)
    plot_affinity(z, names, out / "affinity.png")
    return result


def plot_affinity(z: np.ndarray, names: list[str], path: Path) -> None:
    """Heatmap of Z (rows: stepping task, columns: affected task), annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import atomic_write

    size = 1.2 + 0.7 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    lim = float(np.abs(z).max()) or 1.0
    im = ax.imshow(z, cmap="RdBu", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("task whose loss changes (j)")
    ax.set_ylabel("task that steps (i)")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{z[i, j]:.3f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Z(i→j)")
    ax.set_title("Lookahead task affinity (TAG)")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
