"""The training loop: epochs of balanced multi-task steps, validation-based model selection, a checkpoint
after every epoch, exact resume, divergence checks. Its parts come from `assembly.assemble`, its files go
through `RunDir`, telemetry and measurements are callbacks (`callbacks.py`), checkpoint contents are
`checkpoint.py`'s."""
from __future__ import annotations

import math
import time
from typing import Any, Iterable, NamedTuple

import numpy as np
import torch

from ..balancing import StepContext
from ..device import peak_memory_mb
from ..errors import TrainingDiverged
from ..evaluation.evaluate import evaluate
from ..rundir import RunDir
from . import checkpoint, distributed
from .assembly import Parts, Split
from .callbacks import Callback, Metrics
from .probes import Prober
from .progress import ProgressReporter
from .runtime import Runtime


class Batch(NamedTuple):
    """One training step's input: images of every input group concatenated, labels, each task's rows."""

    x: torch.Tensor
    labels: dict[str, torch.Tensor]
    rows: dict[str, slice]


class Trainer:
    """Trains one multi-task model into a run directory (or resumes the run found there).

    Under torchrun every worker runs one Trainer on its own slice of each global batch (see
    `distributed.py`); rank 0 alone writes the run directory. Build one with `assembly.build_trainer`.
    """

    def __init__(self, parts: Parts, runtime: Runtime, run: RunDir, callbacks: Iterable[Callback] = (),
                 resume: bool = False, quiet: bool = False) -> None:
        self.parts, self.rt, self.run = parts, runtime, run
        self.cfg, self.tasks, self.data, self.model = parts.cfg, parts.tasks, parts.data, parts.model
        self.balancer, self.optimizer, self.scheduler = parts.balancer, parts.optimizer, parts.scheduler
        self.loaders, self.normalize, self.steps = parts.loaders, parts.normalize, parts.steps
        self.device, self.dist, self.resume = runtime.device, runtime.dist, resume
        self.callbacks = list(callbacks)
        self.prober = Prober(self)  # extra forward passes for methods that need them (balancing/context.py)
        self.progress = ProgressReporter(self.cfg.train.epochs, self.steps, enabled=not quiet and self.dist.is_main)
        self.start_epoch, self.wall_before = 0, 0.0
        self.best: dict[str, Any] = {"epoch": -1, "score": -1.0}

    # -- one step --------------------------------------------------------------------------------
    def next_batch(self, epoch: int, step: int) -> Batch:
        """One augmented batch per input group, concatenated and normalised; `rows` is each task's slice."""
        xs, labels, rows, start = [], {}, {}, 0
        for loader, group in zip(self.loaders, self.data.groups):
            x, y = loader.batch(epoch, step, self.steps)
            xs.append(x)
            for name in group.tasks:
                labels[name], rows[name] = y[name], slice(start, start + len(x))
            start += len(x)
        return Batch(self.normalize(xs[0] if len(xs) == 1 else torch.cat(xs)), labels, rows)

    def step_on(self, x: torch.Tensor, labels: dict[str, torch.Tensor], rows: dict[str, slice], epoch: int,
                step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
        """Forward -> task losses -> balanced backward -> optimiser and schedule step; returns (losses, logits,
        task weights). Data parallel: the losses hold the global batch's values, the logits this rank's rows."""
        p = self.parts
        with self.rt.autocast():
            out = p.forward(x)
        logits = {t.name: out.logits[t.name][rows[t.name]].float() for t in self.tasks}
        losses = {t.name: t.loss(logits[t.name], labels[t.name]) for t in self.tasks}
        if self.dist.active:
            losses = self.dist.global_losses(losses, {t.name: (labels[t.name] >= 0).sum() for t in self.tasks})
        self.optimizer.zero_grad(set_to_none=True)
        ctx = StepContext(out.shared, p.shared_params, p.task_params, step, epoch, trunk=out.trunk,
                          all_reduce=self.dist.all_reduce, world_size=self.dist.world_size,
                          probe=self.prober.for_step(x, labels, rows, epoch, step),
                          task_jacobian=out.task_jacobian)  # a closed-form feature-space J, where offered
        weights = self.balancer.backward(losses, ctx)
        self.dist.average_gradients(p.averaged)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        p.finetune.after_step()
        return losses, logits, weights

    def train_step(self, epoch: int, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor], dict[str, float], int]:
        """One optimisation step; returns (losses, logits, labels, task weights, images in the step)."""
        batch = Batch(*self.next_batch(epoch, step))
        for cb in self.callbacks:
            cb.before_step(self, batch, epoch, step)
        losses, logits, weights = self.step_on(batch.x, batch.labels, batch.rows, epoch, step)
        return losses, logits, batch.labels, weights, len(batch.x)

    # -- one epoch -------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> tuple[Metrics, float]:
        self.parts.finetune.start_epoch(epoch)
        names = [t.name for t in self.tasks]
        # running (loss sum, correct, labelled count) per task, and the step at which each task's loss first
        # became NaN/inf (-1: never): all on the device, read only at log points
        sums = torch.zeros(3, len(names), dtype=torch.float64, device=self.device)
        first_bad = torch.full((len(names),), -1, dtype=torch.long, device=self.device)
        log_every = max(1, self.cfg.train.log_every)
        self.dist.seed_epoch(self.cfg.seed, epoch)
        self.progress.start_epoch(epoch)
        t0, seen, stats = time.perf_counter(), 0, {}
        for step in range(self.steps):
            losses, logits, labels, weights, n = self.train_step(epoch, step)
            with torch.no_grad():
                loss = torch.stack([losses[k].detach() for k in names]).double()
                mask = torch.stack([labels[k] >= 0 for k in names])  # (T, B): no boolean indexing (a sync)
                correct = torch.stack([logits[k].argmax(1) == labels[k] for k in names]) & mask
                count = mask.sum(1)
                sums += torch.stack([loss * count, correct.sum(1), count])
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            seen += n * self.dist.world_size
            if (step + 1) % log_every == 0 or step + 1 == self.steps:
                stats = self._read(sums, first_bad, names, epoch)
                self.progress.update(epoch, step + 1, stats, seen / (time.perf_counter() - t0))
                if self.dist.is_main:
                    for cb in self.callbacks:
                        cb.on_log(self, epoch, step, epoch * self.steps + step + 1, stats, weights)
        return stats, seen / (time.perf_counter() - t0)

    def _kept(self) -> str:
        """What a diverged run leaves (a sentence): the last good checkpoint, if one was written."""
        if self.run.has_checkpoint():
            return f"The last good checkpoint is kept at {self.run.checkpoint_path}"
        return "No checkpoint was written (it diverged before the end of its first epoch)"

    def _read(self, sums: torch.Tensor, first_bad: torch.Tensor, names: list[str], epoch: int) -> Metrics:
        """Per-task running loss/accuracy; raises TrainingDiverged naming the first non-finite task."""
        first = first_bad.cpu()
        if (first >= 0).any():
            at = int(first[first >= 0].min())
            culprits = [n for i, n in enumerate(names) if first[i] == at]
            also = f" (with {', '.join(culprits[1:])})" if len(culprits) > 1 else ""
            raise TrainingDiverged(f"task {culprits[0]!r}: loss became NaN/inf in epoch {epoch + 1} at step {at + 1}"
                                   f"{also}; stopped. {self._kept()} (try a lower train.lr or "
                                   "train.grad_clip)")
        s = self.dist.all_reduce(sums).cpu()
        cnt = s[2].clamp(min=1)
        return {n: {"loss": (s[0, i] / cnt[i]).item(), "accuracy": (s[1, i] / cnt[i]).item()}
                for i, n in enumerate(names)}

    def _check_finite(self, epoch: int, val: Metrics) -> None:
        """Before anything of this epoch is written: every parameter and validation loss must be finite (the
        training losses are checked at log points, but not the update of the epoch's last step)."""
        params = [*self.model.parameters(), *self.eval_model.parameters(), *self.balancer.parameters()]
        bad_params = not bool(torch.stack([p.detach().isfinite().all() for p in params]).all())
        bad_val = [n for n, m in val.items() if not math.isfinite(m.get("loss", 0.0))]
        if bad_params or bad_val:
            what = "the model's parameters" if bad_params else f"the validation loss of {', '.join(bad_val)}"
            raise TrainingDiverged(f"{what} became NaN/inf in epoch {epoch + 1}; stopped before saving it. "
                                   f"{self._kept()} (try a lower train.lr or train.grad_clip)")

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights validation, model selection and best.pt use (the EMA's with `finetune.ema`)."""
        return self.parts.finetune.eval_model

    def evaluate(self, splits: Split) -> Metrics:
        return evaluate(self.eval_model, splits, self.tasks, self.normalize, self.cfg.data.eval_batch_size,
                        self.rt.autocast, (self.dist.rank, self.dist.world_size),
                        self.dist.all_reduce if self.dist.active else None)

    @staticmethod
    def score(metrics: Metrics) -> float:
        """Model selection score: mean validation accuracy over tasks."""
        return float(np.mean([m.get("accuracy", 0.0) for m in metrics.values()]))

    # -- the run ---------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train every remaining epoch, then score the best epoch's weights; returns the summary."""
        if self.dist.is_main:
            self.run.remove_stale_temporaries()
        if self.resume:
            checkpoint.restore(self)
        elif self.dist.is_main:  # records the torchrun job: a worker it restarts may replace this folder
            self.run.start_fresh(distributed.job_id())
        if self.dist.is_main:
            self.run.write_config(self.cfg)
        if self.start_epoch >= self.cfg.train.epochs and self.run.is_finished():
            self.progress.message(f"{self.run.path} is finished: all {self.cfg.train.epochs} epochs ran; "
                                  "its summary is left as it was")
            return self.run.read_summary()  # type: ignore[return-value]
        self.progress.message(checkpoint.describe(self))
        for cb in self.callbacks:
            cb.on_fit_start(self)
        t_start = time.perf_counter()
        try:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                train_stats, rate = self.train_epoch(epoch)
                self.balancer.epoch_end(epoch, {n: s["loss"] for n, s in train_stats.items()})
                for module in {id(m): m for m in (self.model, self.eval_model)}.values():
                    self.dist.average_buffers(module)
                val = self.evaluate(self.parts.val_sets)
                self._check_finite(epoch, val)
                score = self.score(val)
                is_best = score > self.best["score"]
                wall = self.wall_before + time.perf_counter() - t_start
                if is_best:
                    self.best = {"epoch": epoch, "score": score}
                if self.dist.is_main:
                    self._save_epoch(epoch, wall, rate, train_stats, val, is_best)
                self.dist.barrier()  # no rank goes on (or may be restarted) before the checkpoint is on disk
                self.progress.end_epoch(epoch, train_stats, val, rate, is_best)
        finally:
            for cb in self.callbacks:
                cb.close()
        return self.finish(self.wall_before + time.perf_counter() - t_start)

    def _save_epoch(self, epoch: int, wall: float, rate: float, train_stats: Metrics, val: Metrics,
                    is_best: bool) -> None:
        """best.pt (when the epoch is the best), its metrics.jsonl line, then checkpoint.pt."""
        if is_best:
            self.run.save_best(checkpoint.best_state(self, epoch))
        line = {"epoch": epoch, "step": (epoch + 1) * self.steps, "wall_time_s": round(wall, 3),
                "images_per_s": round(rate, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "train": train_stats, "val": val}
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch, line, val)
        self.run.append_metrics(line)
        self.run.save_checkpoint(checkpoint.capture(self, epoch, wall))

    def finish(self, wall: float) -> dict[str, Any]:
        """Evaluate the best (validation-selected) weights on val and test; write summary.json."""
        best = self.run.load_best()
        self.eval_model.load_state_dict(best["model"])
        val, test = self.evaluate(self.parts.val_sets), self.evaluate(self.parts.test_sets)
        rates = [m["images_per_s"] for m in self.run.metrics() if m.get("images_per_s")]
        summary: dict[str, Any] = {
            "name": self.cfg.name,
            "tasks": {t.name: {"test": test[t.name], "val": val[t.name], "classes": t.classes} for t in self.tasks},
            "best_epoch": best["epoch"], "epochs": self.cfg.train.epochs, "wall_time_s": round(wall, 2),
            "train_images_per_s": round(float(np.mean(rates)), 1) if rates else None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "peak_memory_mb": peak_memory_mb(self.device),
            "device": str(self.device), "world_size": self.dist.world_size,
            "balancing": self.cfg.balancing.name, "architecture": self.cfg.model.architecture.name,
            "skipped_images": {"count": len(self.data.skipped), "files": self.data.skipped[:50]},
            **checkpoint.run_facts(self),
        }
        if self.dist.is_main:
            self.run.write_summary(summary)
        self.dist.barrier()  # baselines and Δm read it next
        return summary
