r"""Task affinity (TAG: Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task Groupings for
Multi-Task Learning", NeurIPS 2021) measured while a multi-task model trains, and task groupings from it.

Every `every` steps, on the training batch X^t, for each task i a lookahead SGD step on the shared
parameters with task i's gradient alone (eq. 1) and the relative change of every task j's loss (eq. 2):

    θ_s|i = θ_s − η ∇_{θ_s} L_i(X^t)              η: the optimiser's current learning rate
    Z^t_{i→j} = 1 − L_j(X^t; θ_s|i, θ_j) / L_j(X^t; θ_s, θ_j)

Z^t > 0: a step on task i also lowers task j's loss. The affinity Z_{i→j} is the mean of Z^t over the
measured steps in which both tasks had labelled rows (partial labels: a task with none in the batch has no
loss to step on or to compare). Task-specific parameters are not moved by the lookahead; every forward of
one measurement sees the same dropout draws; BatchNorm running statistics touched by the lookahead
forwards and the random stream are restored, so training is exactly the run without measurement.

Grouping (the paper's network selection): choose at most `budget` groups (networks), each a set of tasks,
so that every task is in at least one group, maximising Σ_j max_{G ∋ j} A(G, j), where the affinity onto
j in G is the mean of Z_{i→j} over the other members i of G. A task may sit in more than one group (as a
helper); each task is served by the group that helps it most. One difference from the authors' code: a
task alone scores 0 (no transfer, the single-task network), where theirs scores it -10^6 so that with
overlapping groups no task ever gets a network of its own; here a task that every group would hurt gets one.

Solved exactly in O(3^T) (T ≤ 12): every choice of groups serves the tasks in blocks (the tasks each group
serves best), so the optimum is the best partition of the tasks into ≤ budget blocks S, each scored by
the best group containing it, best(S) = max_{G ⊇ S} Σ_{j∈S} A(G, j); a dynamic programme over subsets finds it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .config import Config, as_config
from .errors import ConfigError, MTLVisionError
from .storage import atomic_write, write_json
from .training import Trainer, build_trainer
from .training.callbacks import Callback
from .training.trainer import Batch

MAX_TASKS = 12  # the grouping search takes O(3^T) time and O(2^T) memory


class AffinityMeasure(Callback):
    """Measures the lookahead affinity on the training batch every `every` steps, before the step's update."""

    key = "affinity"

    def __init__(self, every: int = 10) -> None:
        if every < 1:
            raise ConfigError(f"affinity --every: expected >= 1, got {every}")
        self.every = every
        self.per_epoch: dict[int, np.ndarray] = {}  # epoch -> sum of the measured Z^t (unmeasured pairs: 0)
        self.pair_counts: dict[int, np.ndarray] = {}  # epoch -> measurements per (i, j)
        self.counts: dict[int, int] = {}  # epoch -> measured steps

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.dist.active:
            raise MTLVisionError("affinity: run it in one process (not under torchrun)")

    def before_step(self, trainer: Trainer, batch: Batch, epoch: int, step: int) -> None:
        if step % self.every == 0:
            z = lookahead_affinity(trainer, batch.x, batch.labels, batch.rows)
            measured = np.isfinite(z)
            self.per_epoch[epoch] = self.per_epoch.get(epoch, 0) + np.where(measured, z, 0.0)
            self.pair_counts[epoch] = self.pair_counts.get(epoch, 0) + measured
            self.counts[epoch] = self.counts.get(epoch, 0) + 1

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "per_epoch": {e: z.tolist() for e, z in self.per_epoch.items()},
                "pair_counts": {e: n.tolist() for e, n in self.pair_counts.items()}, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("every") != self.every:
            raise MTLVisionError(f"the checkpoint holds affinity measurements taken every {state.get('every')} "
                                 f"steps, not {self.every}; measure into a new --out")
        self.per_epoch = {int(e): np.asarray(z) for e, z in state["per_epoch"].items()}
        self.pair_counts = {int(e): np.asarray(n) for e, n in state["pair_counts"].items()}
        self.counts = {int(e): n for e, n in state["counts"].items()}

    def epoch_matrix(self, epoch: int) -> np.ndarray:
        """Mean Z over one epoch's measurements (NaN for a pair never measured in it)."""
        return _mean(self.per_epoch[epoch], self.pair_counts[epoch])

    def matrix(self) -> np.ndarray:
        """Mean Z over every measurement so far (NaN for a pair never measured)."""
        return _mean(sum(self.per_epoch.values()), sum(self.pair_counts.values()))


def affinity_trainer(cfg: Config, out_dir: str | os.PathLike, every: int = 10, resume: bool = False,
                     quiet: bool = False) -> tuple[Trainer, AffinityMeasure]:
    """A trainer that measures the affinity as it trains (otherwise training exactly as without it)."""
    measure = AffinityMeasure(every)
    return build_trainer(cfg, out_dir, resume=resume, quiet=quiet, callbacks=[measure]), measure


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def lookahead_affinity(trainer: Trainer, x: torch.Tensor, labels: dict[str, torch.Tensor],
                       rows: dict[str, slice]) -> np.ndarray:
    """Z^t (T x T, row i = the task whose gradient steps, column j = the task whose loss changes); NaN in
    the rows and columns of tasks without labelled rows in this batch (no loss to step on or compare)."""
    model, tasks = trainer.model, trainer.tasks
    params = [p for p in trainer.parts.shared_params if p.requires_grad]
    lr = trainer.optimizer.param_groups[0]["lr"]
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [trainer.device] if trainer.device.type == "cuda" else []

    def task_losses() -> torch.Tensor:
        torch.set_rng_state(cpu_rng)  # every forward draws the same dropout masks: Z compares parameters only
        if devices:
            torch.cuda.set_rng_state_all(cuda_rng)
        with trainer.rt.autocast():
            out = model(x)
        return torch.stack([t.loss(out.logits[t.name][rows[t.name]].float(), labels[t.name]) for t in tasks])

    # the model's plain (unsplit) forward: every task's loss reaches the trunk's parameters
    with torch.random.fork_rng(devices=devices):  # dropout draws here must not shift training's stream
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if devices else []
        base = task_losses()
        grads = [torch.autograd.grad(base[i], params, retain_graph=i < len(tasks) - 1, allow_unused=True)
                 for i in range(len(tasks))]
        z = _lookahead(base.detach(), grads, params, lr, buffers, model, task_losses)
    labelled = np.array([bool((labels[t.name] >= 0).any()) for t in tasks]) & (base.detach().cpu().numpy() > 0)
    z[~labelled, :] = np.nan
    z[:, ~labelled] = np.nan
    return z


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


def _best_served(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every task set S (bitmask): best(S) = max over groups G ⊇ S of Σ_{j∈S} A(G, j), and that G."""
    t = len(z)
    best = np.full(1 << t, -np.inf)
    arg = np.zeros(1 << t, np.int64)
    off_diagonal = z - np.diag(np.diag(z))
    for g in sorted(range(1, 1 << t), key=int.bit_count):  # smaller groups first: they win ties (no idle helpers)
        members = np.array([j for j in range(t) if g >> j & 1])
        n = len(members)
        # A(G, j): mean of Z_{i→j} over the other members i (0 for a task alone)
        onto = off_diagonal[np.ix_(members, members)].sum(0) / (n - 1) if n > 1 else np.zeros(1)
        bits = (np.arange(1 << n)[:, None] >> np.arange(n)) & 1  # every subset S of G, as rows of member bits
        sets, value = bits @ (1 << members), bits @ onto
        better = value > best[sets] + 1e-12  # a larger group must do strictly better, not by rounding
        best[sets[better]], arg[sets[better]] = value[better], g
    return best, arg


def _blocks(m: int) -> np.ndarray:
    """The subsets of task set m that hold m's lowest task: one block of each partition of m, counted once."""
    low, rest, out = m & -m, m & (m - 1), []
    s = rest
    while True:  # every subset s of the other tasks, by the (s - 1) & rest walk
        out.append(s | low)
        if s == 0:
            break
        s = (s - 1) & rest
    return np.array(out if m else [], np.int64)


def best_groupings(z: np.ndarray, max_budget: int) -> list[tuple[list[tuple[int, ...]], float]]:
    """For each budget K = 1..max_budget: the ≤ K groups covering every task that maximise the total
    affinity the tasks receive (each from its best group), and that total."""
    t = len(z)
    if not 1 <= max_budget <= t:
        raise ConfigError(f"affinity --budget: expected 1..{t} (the number of tasks), got {max_budget}")
    if t > MAX_TASKS:
        raise MTLVisionError(f"affinity grouping: the exact search is limited to {MAX_TASKS} tasks, got {t}")
    if not np.isfinite(z).all():
        raise MTLVisionError("affinity grouping: the matrix has unmeasured or non-finite entries")
    best, arg = _best_served(z)
    full = (1 << t) - 1
    blocks = [_blocks(m) for m in range(full + 1)]
    f = best.copy()  # f[m]: the best total over partitions of m into ≤ k blocks (k = 1)
    f[0] = 0.0
    choices, results = [], []
    for k in range(1, max_budget + 1):
        if k > 1:
            g, choice = f.copy(), np.zeros(full + 1, np.int64)
            for m in range(1, full + 1):
                cand = best[blocks[m]] + f[m ^ blocks[m]]
                i = int(np.argmax(cand))
                if cand[i] > g[m]:
                    g[m], choice[m] = cand[i], blocks[m][i]
            f = g
            choices.append(choice)
        # unwind: at level k a state either takes one block (choice) or keeps level k-1's partition
        parts, m = [], full
        for level in range(k, 0, -1):
            s = m if level == 1 else choices[level - 2][m]
            if s:
                parts.append(int(s))
                m ^= s
            if not m:
                break
        groups = sorted({tuple(j for j in range(t) if arg[s] >> j & 1) for s in parts})
        results.append((groups, float(f[full])))
    return results


def run_affinity(config: Config | dict | str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
                 every: int = 10, budgets: Optional[list[int]] = None, resume: bool = False,
                 quiet: bool = False) -> dict[str, Any]:
    """Train the config while measuring affinity; write affinity.json and affinity.png; return the result."""
    cfg = as_config(config)
    out = Path(out_dir) if out_dir is not None else Path("runs") / f"{cfg.name}-affinity"
    trainer, measure = affinity_trainer(cfg, out, every=every, resume=resume, quiet=quiet)
    names = [t.name for t in trainer.tasks]
    budgets = budgets or list(range(1, len(names) + 1))
    bad = [b for b in budgets if not 1 <= b <= len(names)]
    if bad:  # checked before training, as is the task count below
        raise ConfigError(f"affinity --budget: expected 1..{len(names)} (the number of tasks), got {bad[0]}")
    if len(names) > MAX_TASKS:
        raise MTLVisionError(f"affinity grouping: the exact search is limited to {MAX_TASKS} tasks, got {len(names)}")
    trainer.fit()
    z = measure.matrix()
    unmeasured = sorted({names[k] for k in np.argwhere(~np.isfinite(z)).ravel()})
    if unmeasured:
        raise MTLVisionError(f"affinity: task(s) {', '.join(unmeasured)} had no labelled rows in any measured "
                             f"batch ({int(sum(measure.counts.values()))} measurements); measure more often (--every)")
    best = best_groupings(z, max(budgets))
    groupings = [{"budget": b, "groups": [[names[i] for i in g] for g in best[b - 1][0]], "score": best[b - 1][1]}
                 for b in budgets]
    result = {
        "tasks": names, "every": every, "measurements": int(sum(measure.counts.values())),
        "affinity": z.tolist(),
        "per_epoch": {str(e): np.where(np.isnan(m := measure.epoch_matrix(e)), None, m).tolist()
                      for e in sorted(measure.counts)},
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
