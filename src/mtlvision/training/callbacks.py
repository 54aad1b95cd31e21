"""Callbacks: what watches a training run without being the loop (telemetry, TensorBoard, measurements).

The trainer calls every callback at fixed points; a callback never changes what is trained unless it
says so. A callback with a `key` has state that is checkpointed under `checkpoint["callbacks"][key]`
and restored on resume (a resumed run must find it there).

    on_fit_start(trainer)                                          once, after a resume is restored
    before_step(trainer, batch, epoch, step)                       every step, before the update
    on_log(trainer, epoch, step, global_step, stats, weights)      every train.log_every steps, rank 0 only
    on_epoch_end(trainer, epoch, line, val)                        rank 0, before metrics.jsonl gets `line`
    close()                                                        when fit ends (also on errors)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..balancing.base import gradient_stats

if TYPE_CHECKING:
    from .trainer import Batch, Trainer

Metrics = dict[str, dict[str, float]]


class Callback:
    key: Optional[str] = None  # name of its checkpointed state; None: stateless

    def on_fit_start(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer", batch: "Batch", epoch: int, step: int) -> None:
        pass

    def on_log(self, trainer: "Trainer", epoch: int, step: int, global_step: int, stats: Metrics,
               weights: dict[str, float]) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", epoch: int, line: dict[str, Any], val: Metrics) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Telemetry(Callback):
    """TensorBoard scalars (train losses, task weights, lr, gradient norms and cosines, validation metrics)
    and the epoch means of the sampled task weights and gradient statistics (metrics.jsonl `balancing`)."""

    def __init__(self, tb_dir: str) -> None:
        self.tb_dir = tb_dir
        self._tb: Any = None
        self.samples: list[dict[str, Any]] = []

    @property
    def tb(self) -> Any:
        """TensorBoard SummaryWriter, created on first use (its import is slow)."""
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir)
        return self._tb

    def on_log(self, trainer: "Trainer", epoch: int, step: int, global_step: int, stats: Metrics,
               weights: dict[str, float]) -> None:
        for name in stats:
            self.tb.add_scalar(f"train_loss/{name}", stats[name]["loss"], global_step)
            self.tb.add_scalar(f"task_weight/{name}", weights[name], global_step)
        self.tb.add_scalar("lr", trainer.optimizer.param_groups[0]["lr"], global_step)
        sample: dict[str, Any] = {"weight": dict(weights)}
        if trainer.balancer.gramian is not None:
            sample.update(gradient_stats(trainer.balancer.gramian, list(stats)))
            for kind in ("norm", "cosine"):
                for key, value in sample[kind].items():
                    self.tb.add_scalar(f"grad_{kind}/{key}", value, global_step)
        self.samples.append(sample)

    def on_epoch_end(self, trainer: "Trainer", epoch: int, line: dict[str, Any], val: Metrics) -> None:
        samples, self.samples = self.samples, []
        line["balancing"] = {kind: {k: float(np.mean([s[kind][k] for s in samples])) for k in samples[0][kind]}
                             for kind in samples[0]} if samples else {}
        for n, m in val.items():
            for k, v in m.items():
                if k != "count":
                    self.tb.add_scalar(f"val_{k}/{n}", v, line["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
