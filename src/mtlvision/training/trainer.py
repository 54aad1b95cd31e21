"""The training loop: epochs of balanced multi-task steps, validation-based model selection,
atomic checkpoints every epoch, exact resume, NaN detection, metrics.jsonl and TensorBoard logs."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..balancing import StepContext, build_balancer
from ..balancing.base import gradient_stats
from ..config import Config, as_config, save_config
from ..data import build_data
from ..data.loader import BatchAugment, Normalize, TensorImages, TrainLoader
from ..data.stream import StreamLoader
from ..errors import CheckpointError, ConfigError, TrainingDiverged
from ..evaluation.evaluate import evaluate
from ..models import build_model
from ..storage import save_torch, write_json, write_text
from . import distributed
from .optim import build_optimizer, build_scheduler
from .progress import ProgressReporter

# Config keys that may change when resuming (they do not alter what is computed).
RESUMABLE_CHANGES = {"name", "train.log_every", "train.device", "train.threads", "train.compile"}
CHECKPOINT_KEYS = ("epoch", "wall_time_s", "best", "config", "tasks", "input", "model", "optimizer",
                   "scheduler", "balancer", "balancer_extra", "rng")

Metrics = dict[str, dict[str, float]]


def resolve_device(name: str) -> torch.device:
    """'auto' (a GPU when there is one), 'cpu', 'cuda' or 'cuda:N'; anything else is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device: {name!r} asked for, but no CUDA GPU is available (use auto or cpu)")
    return device


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}


def config_differences(a: dict, b: dict) -> list[str]:
    """Flattened keys whose values differ, ignoring the keys a resume may change."""
    fa, fb = _flatten(a), _flatten(b)
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and k not in RESUMABLE_CHANGES)


def load_checkpoint(path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """torch.load with weights_only=True; a missing, unreadable or incomplete file is a CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not an mtlvision checkpoint (missing {', '.join(missing)})")
    return ckpt


class Trainer:
    """Trains one multi-task model into `out_dir` (or resumes the run found there).

    Under torchrun every worker runs one Trainer on its own slice of each global batch (see
    `distributed.py`); rank 0 alone writes the run directory. A worker that torchrun restarted after a
    failure resumes from `out_dir`'s checkpoint when there is one, as if `resume` were given.
    """

    def __init__(self, cfg: Config, out_dir: str | os.PathLike, resume: bool = False, quiet: bool = False) -> None:
        tc = cfg.train
        self.dist, self.device = distributed.setup(resolve_device(tc.device))
        self.cfg, self.out = cfg, Path(out_dir)
        # every rank resumes if any was restarted (torchrun's restart count is kept per node)
        restarted = self.dist.any_rank(distributed.restart_count() > 0, self.device)
        self.resume = resume = resume or (restarted and (self.out / "checkpoint.pt").is_file())
        if resume and not (self.out / "checkpoint.pt").is_file():
            raise CheckpointError(f"--resume {self.out}: no checkpoint.pt there")
        if not resume and (self.out / "checkpoint.pt").exists():
            raise CheckpointError(f"{self.out} already holds a run; use --resume {self.out} or another --out")
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.amp_dtype = torch.bfloat16 if (tc.precision == "bf16" or (
            tc.precision == "auto" and self.device.type == "cuda")) else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = not tc.deterministic
            torch.backends.cudnn.deterministic = tc.deterministic
            tf32 = tc.precision != "fp32"  # fp32 means fp32: no TF32 matmuls/convolutions
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(cfg.seed)
        self.data = build_data(cfg)
        self.tasks = self.data.tasks
        self.model = build_model(cfg.model, self.tasks, self.data.image_shape).to(self.device)
        if tc.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.balancer = build_balancer(cfg.balancing, self.tasks).to(self.device)
        forward = torch.compile(self.model) if tc.compile else self.model
        split = self.balancer.needs_shared_features  # feature-space methods differentiate at the cut
        self.forward = (lambda x: forward(x, split=True)) if split else forward
        self.normalize = Normalize(self.data.mean, self.data.std, self.device, tc.channels_last)
        d = cfg.data
        self.val_sets = [(TensorImages(s.val, self.device), s.tasks) for s in self.data.streams]
        self.test_sets = [(TensorImages(s.test, self.device), s.tasks) for s in self.data.streams]
        self.loaders = []
        for i, s in enumerate(self.data.streams):
            flip = d.augment.flip and s.flip
            augment = BatchAugment(d.augment.crop_padding, flip) if (flip or d.augment.crop_padding) else None
            if s.streamed is not None:
                self.loaders.append(StreamLoader(s.streamed, d.batch_size, cfg.seed, i, augment, self.dist.rank,
                                                 self.dist.world_size, self.device, tc.epochs))
                continue
            self.loaders.append(TrainLoader(TensorImages(s.train, self.device), d.batch_size, cfg.seed, i, augment,
                                            self.dist.rank, self.dist.world_size))
        self.steps = max(ld.natural_steps for ld in self.loaders)
        self._shared_params = self.model.shared_parameters()
        self._task_params = self.model.task_parameters()
        # gradients averaged over ranks after each backward (not the trunk's when the method did it)
        self._averaged = [*self._task_params, *self.balancer.parameters(),
                          *([] if self.balancer.shared_grads_reduced else self._shared_params)]
        self.optimizer = build_optimizer(tc, self.model, list(self.balancer.parameters()))
        self.scheduler = build_scheduler(tc, self.optimizer, self.steps)
        self.progress = ProgressReporter(tc.epochs, self.steps, enabled=not quiet and self.dist.is_main)
        self.start_epoch, self.wall_before = 0, 0.0
        self.best: dict[str, Any] = {"epoch": -1, "score": -1.0}
        self._tb: Any = None
        self.telemetry: dict[str, dict[str, float]] = {}  # epoch means of sampled weights / grad stats

    # -- state -----------------------------------------------------------------------------------
    def input_spec(self) -> dict[str, Any]:
        return {"mean": self.data.mean, "std": self.data.std, "image_shape": list(self.data.image_shape)}

    def _state(self, epoch: int, wall: float) -> dict[str, Any]:
        return {
            "epoch": epoch, "wall_time_s": wall, "best": self.best, "config": self.cfg.to_dict(),
            "tasks": [t.to_dict() for t in self.tasks], "input": self.input_spec(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "balancer": self.balancer.state_dict(),
            "balancer_extra": self.balancer.extra_state(), "world_size": self.dist.world_size,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
        }

    def _restore(self) -> None:
        path = self.out / "checkpoint.pt"
        ckpt = load_checkpoint(path, CHECKPOINT_KEYS)
        diff = config_differences(ckpt["config"], self.cfg.to_dict())
        if diff:
            raise CheckpointError(f"{path} does not match the config; differing keys: {', '.join(diff[:12])}")
        if ckpt.get("world_size", 1) != self.dist.world_size:  # the global batch, steps and schedule would change
            raise CheckpointError(f"{path} was written by a run of {ckpt.get('world_size', 1)} process(es); "
                                  f"resume it with as many (this is {self.dist.world_size})")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.balancer.load_state_dict(ckpt["balancer"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path} does not match the model: {exc}") from None
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.balancer.load_extra_state(ckpt["balancer_extra"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        # normalise with the statistics the run started with (its input spec), as predict and export do
        self.data.mean, self.data.std = ckpt["input"]["mean"], ckpt["input"]["std"]
        self.normalize = Normalize(self.data.mean, self.data.std, self.device, self.cfg.train.channels_last)
        self.start_epoch, self.wall_before, self.best = ckpt["epoch"] + 1, ckpt["wall_time_s"], ckpt["best"]
        log = self.out / "metrics.jsonl"
        # keep lines up to the checkpoint (a crash can leave a later or a torn line)
        if self.dist.is_main and log.exists():
            kept = []
            for line in log.read_text().splitlines():
                try:
                    if json.loads(line)["epoch"] <= ckpt["epoch"]:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
            write_text(log, "".join(x + "\n" for x in kept))
        self.progress.message(f"resumed {self.out} after epoch {ckpt['epoch'] + 1}")

    def _clear_stale(self) -> None:
        """A fresh run in a folder whose earlier attempt died before its first checkpoint."""
        for name in ("metrics.jsonl", "best.pt", "summary.json"):
            (self.out / name).unlink(missing_ok=True)
        shutil.rmtree(self.out / "tb", ignore_errors=True)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def tb(self) -> Any:
        """TensorBoard SummaryWriter, created on first use (its import is slow)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out / "tb"))
        return self._tb

    # -- one step --------------------------------------------------------------------------------
    def next_batch(self, epoch: int, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, slice]]:
        """One augmented batch per stream, concatenated and normalised; `rows` is each task's slice."""
        xs, labels, rows, start = [], {}, {}, 0
        for loader, stream in zip(self.loaders, self.data.streams):
            x, y = loader.batch(epoch, step, self.steps)
            xs.append(x)
            for name in stream.tasks:
                labels[name], rows[name] = y[name], slice(start, start + len(x))
            start += len(x)
        return self.normalize(xs[0] if len(xs) == 1 else torch.cat(xs)), labels, rows

    def step_on(self, x: torch.Tensor, labels: dict[str, torch.Tensor], rows: dict[str, slice], epoch: int,
                step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float]]:
        """Forward -> task losses -> balanced backward -> optimiser and schedule step.

        Data parallel: the returned losses hold the global batch's values, the logits this rank's rows.
        """
        with self.autocast():
            out = self.forward(x)
        logits = {t.name: out.logits[t.name][rows[t.name]].float() for t in self.tasks}
        losses = {t.name: t.loss(logits[t.name], labels[t.name]) for t in self.tasks}
        if self.dist.active:
            losses = self.dist.global_losses(losses, {t.name: (labels[t.name] >= 0).sum() for t in self.tasks})
        self.optimizer.zero_grad(set_to_none=True)
        ctx = StepContext(out.shared, self._shared_params, self._task_params, step, epoch, trunk=out.trunk,
                          all_reduce=self.dist.all_reduce, world_size=self.dist.world_size)
        weights = self.balancer.backward(losses, ctx)
        self.dist.average_gradients(self._averaged)
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return losses, logits, weights

    def train_step(self, epoch: int, step: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                         dict[str, torch.Tensor], dict[str, float], int]:
        """One optimisation step; returns (losses, logits, labels, task weights, images in the step)."""
        x, labels, rows = self.next_batch(epoch, step)
        losses, logits, weights = self.step_on(x, labels, rows, epoch, step)
        return losses, logits, labels, weights, len(x)

    # -- loop ------------------------------------------------------------------------------------
    def _train_epoch(self, epoch: int) -> tuple[Metrics, float]:
        self.model.train()
        names = [t.name for t in self.tasks]
        # running (loss sum, correct, labelled count) per task, and the step at which each task's
        # loss first became NaN/inf (-1: never): all on the device, read only at log points
        sums = torch.zeros(3, len(names), dtype=torch.float64, device=self.device)
        first_bad = torch.full((len(names),), -1, dtype=torch.long, device=self.device)
        log_every = max(1, self.cfg.train.log_every)
        self.dist.seed_epoch(self.cfg.seed, epoch)
        self.progress.start_epoch(epoch)
        t0, seen = time.perf_counter(), 0
        stats: Metrics = {}
        samples: list[dict[str, Any]] = []  # sampled task weights and gradient statistics
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
                if not self.dist.is_main:
                    continue
                gstep = epoch * self.steps + step + 1
                for name in names:
                    self.tb.add_scalar(f"train_loss/{name}", stats[name]["loss"], gstep)
                    self.tb.add_scalar(f"task_weight/{name}", weights[name], gstep)
                self.tb.add_scalar("lr", self.optimizer.param_groups[0]["lr"], gstep)
                sample: dict[str, Any] = {"weight": dict(weights)}
                if self.balancer.gramian is not None:
                    sample.update(gradient_stats(self.balancer.gramian, names))
                    for kind in ("norm", "cosine"):
                        for key, value in sample[kind].items():
                            self.tb.add_scalar(f"grad_{kind}/{key}", value, gstep)
                samples.append(sample)
        self.telemetry = {kind: {k: float(np.mean([s[kind][k] for s in samples])) for k in samples[0][kind]}
                          for kind in samples[0]} if samples else {}
        return stats, seen / (time.perf_counter() - t0)

    def _read(self, sums: torch.Tensor, first_bad: torch.Tensor, names: list[str], epoch: int) -> Metrics:
        """Per-task running loss/accuracy; raises TrainingDiverged naming the first non-finite task."""
        first = first_bad.cpu()
        if (first >= 0).any():
            at = int(first[first >= 0].min())
            culprits = [n for i, n in enumerate(names) if first[i] == at]
            also = f" (with {', '.join(culprits[1:])})" if len(culprits) > 1 else ""
            raise TrainingDiverged(
                f"task {culprits[0]!r}: loss became NaN/inf in epoch {epoch + 1} at step {at + 1}{also}; stopped. "
                f"The last good checkpoint is kept at {self.out / 'checkpoint.pt'} "
                "(try a lower train.lr or train.grad_clip)")
        s = self.dist.all_reduce(sums).cpu()
        cnt = s[2].clamp(min=1)
        return {n: {"loss": (s[0, i] / cnt[i]).item(), "accuracy": (s[1, i] / cnt[i]).item()}
                for i, n in enumerate(names)}

    def _evaluate(self, splits: list[tuple[TensorImages, list[str]]]) -> Metrics:
        return evaluate(self.model, splits, self.tasks, self.normalize, self.cfg.data.eval_batch_size,
                        self.autocast, (self.dist.rank, self.dist.world_size),
                        self.dist.all_reduce if self.dist.active else None)

    @staticmethod
    def _score(metrics: Metrics) -> float:
        """Model selection score: mean validation accuracy over tasks."""
        return float(np.mean([m.get("accuracy", 0.0) for m in metrics.values()]))

    def fit(self) -> dict[str, Any]:
        """Train every remaining epoch, then score the best epoch's weights; returns the summary."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._restore()
        elif self.dist.is_main:
            self._clear_stale()
        if self.dist.is_main:
            write_text(self.out / "config.yaml", save_config(self.cfg))
        n_params = sum(p.numel() for p in self.model.parameters())
        streams = self.data.streams
        self.progress.message(
            f"{len(self.tasks)} task(s) {[t.name for t in self.tasks]}  |  {n_params / 1e6:.2f}M parameters  |  "
            f"{sum(s.train_size for s in streams)} train{' (streamed)' if streams[0].streamed else ''} / "
            f"{sum(len(s.val) for s in streams)} val / "
            f"{sum(len(s.test) for s in streams)} test images  |  device {self.device}"
            + (f" x {self.dist.world_size} ranks" if self.dist.active else ""))
        t_start = time.perf_counter()
        rates = []
        try:
            for epoch in range(self.start_epoch, self.cfg.train.epochs):
                train_stats, rate = self._train_epoch(epoch)
                rates.append(rate)
                self.balancer.epoch_end(epoch, {n: s["loss"] for n, s in train_stats.items()})
                self.dist.average_buffers(self.model)
                val = self._evaluate(self.val_sets)
                score = self._score(val)
                is_best = score > self.best["score"]
                wall = self.wall_before + time.perf_counter() - t_start
                if is_best:
                    self.best = {"epoch": epoch, "score": score}
                if self.dist.is_main:
                    self._save_epoch(epoch, wall, rate, train_stats, val, is_best)
                self.dist.barrier()  # no rank goes on (or may be restarted) before the checkpoint is on disk
                self.progress.end_epoch(epoch, train_stats, val, rate, is_best)
        finally:
            if self._tb is not None:
                self._tb.close()
                self._tb = None
        return self.finish(self.wall_before + time.perf_counter() - t_start, rates)

    def _save_epoch(self, epoch: int, wall: float, rate: float, train_stats: Metrics, val: Metrics,
                    is_best: bool) -> None:
        """best.pt (when the epoch is the best), its metrics.jsonl line and TensorBoard scalars, then checkpoint.pt."""
        if is_best:
            save_torch(self.out / "best.pt", {"model": self.model.state_dict(), "epoch": epoch,
                                              "tasks": [t.to_dict() for t in self.tasks],
                                              "input": self.input_spec(), "config": self.cfg.to_dict()})
        line = {"epoch": epoch, "step": (epoch + 1) * self.steps, "wall_time_s": round(wall, 3),
                "images_per_s": round(rate, 1), "lr": self.optimizer.param_groups[0]["lr"],
                "train": train_stats, "val": val, "balancing": self.telemetry}
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")
        for n, m in val.items():
            for k, v in m.items():
                if k != "count":
                    self.tb.add_scalar(f"val_{k}/{n}", v, (epoch + 1) * self.steps)
        save_torch(self.out / "checkpoint.pt", self._state(epoch, wall))

    def finish(self, wall: float, rates: list[float]) -> dict[str, Any]:
        """Evaluate the best (validation-selected) weights on val and test; write summary.json."""
        best = load_checkpoint(self.out / "best.pt", ("model", "epoch"))
        self.model.load_state_dict(best["model"])
        val, test = self._evaluate(self.val_sets), self._evaluate(self.test_sets)
        summary: dict[str, Any] = {
            "name": self.cfg.name,
            "tasks": {t.name: {"test": test[t.name], "val": val[t.name], "classes": t.classes}
                      for t in self.tasks},
            "best_epoch": best["epoch"], "epochs": self.cfg.train.epochs, "wall_time_s": round(wall, 2),
            "train_images_per_s": round(float(np.mean(rates)), 1) if rates else None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "peak_memory_mb": peak_memory_mb(self.device),
            "device": str(self.device), "world_size": self.dist.world_size,
            "balancing": self.cfg.balancing.name,
            "architecture": self.cfg.model.architecture.name,
            "skipped_images": {"count": len(self.data.skipped), "files": self.data.skipped[:50]},
        }
        if self.dist.is_main:
            write_json(self.out / "summary.json", summary)
        self.dist.barrier()  # baselines and Δm read it next
        return summary


def peak_memory_mb(device: torch.device) -> Optional[float]:
    """Peak memory of this process: allocated GPU memory on CUDA, else the resident set size (RSS)."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def default_out_dir(cfg: Config) -> Path:
    return Path("runs") / cfg.name


def train(config: Config | dict | str | os.PathLike, out_dir: Optional[str | os.PathLike] = None,
          resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train (or resume) a run; with `baselines.single_task`, also the single-task runs and Δm.

    Under torchrun every worker calls this with the same arguments (see `distributed.py`).
    """
    from .baselines import attach_delta_m, check_baseline_runs, train_single_task_baselines

    cfg = as_config(config)
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    check_baseline_runs(cfg)
    try:
        trainer = Trainer(cfg, out, resume=resume, quiet=quiet)
        summary = trainer.fit()
        stl_dirs = dict(cfg.baselines.runs)
        if cfg.baselines.single_task:
            stl_dirs.update(train_single_task_baselines(cfg, out, list(summary["tasks"]), quiet))
        if stl_dirs:
            summary = attach_delta_m(out, summary, stl_dirs, write=trainer.dist.is_main)
    finally:
        distributed.shutdown()
    return summary
