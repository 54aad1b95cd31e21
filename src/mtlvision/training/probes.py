"""The probe the trainer gives balancing methods that need more than the step's own forward pass.

See `balancing/context.py` for what a probe promises. Here: extra training batches come from each input
group's `TrainLoader.extra_batch` (keyed by seed, stream, epoch, step and index, augmented like the step's
own), validation batches from the validation split by the same keyed draw without augmentation, and the
forward runs through `torch.func.functional_call` with shifted parameters and copied buffers, so neither
the model's parameters nor its BatchNorm statistics change.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call

from ..balancing import Probe, StepContext
from ..data.loader import TrainLoader, keyed_batch
from ..errors import MTLVisionError
from ..rng import keyed_generator

if TYPE_CHECKING:
    from .trainer import Trainer


class Prober:
    """Builds each step's probe for one trainer."""

    def __init__(self, trainer: "Trainer") -> None:
        self.tr = trainer

    def _batch(self, kind: str, epoch: int, step: int, index: int,
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, slice]]:
        tr = self.tr
        xs, labels, rows, start = [], {}, {}, 0
        for i, (loader, group) in enumerate(zip(tr.loaders, tr.data.groups)):
            if not isinstance(loader, TrainLoader):
                raise MTLVisionError(f"balancing method {tr.cfg.balancing.name!r} draws extra mini-batches, which a "
                                     "training split streamed from shards (stream: true) cannot give; decode it "
                                     "into the cache instead (stream: false)")
            if kind == "train":
                x, y = loader.extra_batch(epoch, step, index)
            else:
                val = tr.parts.val_sets[i][0]
                g = keyed_generator(tr.cfg.seed, i, epoch, step, index, -4)
                x, y = keyed_batch(val, min(loader.batch_size, len(val)), g, tr.dist.rank, tr.dist.world_size)
            xs.append(x)
            for name in group.tasks:
                labels[name], rows[name] = y[name], slice(start, start + len(x))
            start += len(x)
        return tr.normalize(xs[0] if len(xs) == 1 else torch.cat(xs)), labels, rows

    def for_step(self, x: torch.Tensor, labels: dict[str, torch.Tensor], rows: dict[str, slice], epoch: int,
                 step: int):
        tr = self.tr
        split = tr.balancer.needs_shared_features

        def probe(batch: Literal["train", "val"] = "train", index: int = 1,
                  shift: Optional[Mapping[nn.Parameter, torch.Tensor]] = None) -> Probe:
            if batch not in ("train", "val") or index < 0:
                raise MTLVisionError(f"probe: batch must be 'train' or 'val' and index >= 0, got {batch!r}, {index}")
            px, py, prow = (x, labels, rows) if (batch == "train" and index == 0) else \
                self._batch(batch, epoch, step, index)
            moved = {id(p): d for p, d in (shift or {}).items()}
            state = {n: (p + moved[id(p)] if id(p) in moved else p) for n, p in tr.model.named_parameters()}
            state.update({n: b.clone() for n, b in tr.model.named_buffers()})  # BatchNorm statistics untouched
            with tr.rt.autocast():
                out = functional_call(tr.model, state, (px,), {"split": split})
            losses = {t.name: t.loss(out.logits[t.name][prow[t.name]].float(), py[t.name]) for t in tr.tasks}
            if tr.dist.active:
                losses = tr.dist.global_losses(losses, {t.name: (py[t.name] >= 0).sum() for t in tr.tasks})
            ctx = StepContext(out.shared, tr.parts.shared_params, tr.parts.task_params, step, epoch,
                              trunk=out.trunk, all_reduce=tr.dist.all_reduce, world_size=tr.dist.world_size,
                              task_jacobian=out.task_jacobian)
            return Probe(losses, ctx)

        return probe
