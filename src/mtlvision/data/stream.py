"""A training split streamed from tar shards each epoch, for sets too large to decode into memory.

`data.source: {name: shards, path: DIR, stream: true, workers: N}`: the Trainer reads the training split
with a `StreamLoader` (the interface of `TrainLoader`: `natural_steps`, `batch(epoch, step, steps)`,
`batch_size`) instead of decoding it; val, test and a statistics sample are decoded into the cache as usual
(`sources/shards.py`). Per epoch, each rank iterates a DataLoader over `ShardReader(rank, world_size, seed,
epoch, drop_uneven=True)` (see `shards.py` for how shards are split across ranks and workers).

Semantics, per epoch and rank:

- batches have exactly `batch_size` images: the workers' batches are re-batched across worker boundaries in
  the training process (a worker's short last batch is completed by the next worker's rows);
- steps: S = min over the run's epochs of floor(samples this rank reads / batch_size). The per-rank sample
  count comes from the index and, with `drop_uneven`, is the same on every rank, so every rank runs S steps.
  Each epoch yields exactly S batches and drops the rest (fewer than `batch_size` samples, plus whatever an
  epoch reads above the minimum): every sample is used at most once per epoch, and exactly once when each
  rank's samples divide into S full batches in every epoch (equal shards, divisible counts). What is dropped
  changes from epoch to epoch with the seeded shard order and shuffle;
- augmentation parameters for the epoch come from a generator keyed by (seed, stream, epoch, rank); step s
  takes rows [sB, (s + 1)B) of them, so the batch and its augmentation depend only on (seed, epoch, step);
- access is sequential: step 0 starts an epoch's stream, any other step must follow the previous one.
  Checkpoints are written per epoch, so a resumed run restarts the stream at the start of the epoch after its
  checkpoint and reads exactly what an uninterrupted run reads there.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError, DataError
from ..rng import keyed_generator
from .arrays import ImageSet, adapt_images, channel_stats
from .loader import BatchAugment
from .shards import ShardReader
from .sources import Source
from .sources.shards import STREAM_ONLY, ShardsParams, ShardsSource

Batch = tuple[torch.Tensor, dict[str, torch.Tensor]]
CPU = torch.device("cpu")


@dataclasses.dataclass
class ShardStream:
    """A streamed training split (`InputGroup.streamed`): what each rank builds its `StreamLoader` from."""

    root: Path
    samples: int  # training samples in the streamed shards
    hold_out: int  # trailing training shards held out as the validation split
    image_size: Optional[int]  # data.image_size: resize the short side and centre-crop, as the cache does
    channels: int  # channels decoded (the source's)
    out_channels: Optional[int]  # data.channels: converted as the cache converts
    workers: int
    shuffle_buffer: int
    tasks: list[str]  # the tasks kept, derived ones included
    derive: dict[str, tuple[str, np.ndarray]]  # derived task -> (its source task, class map; last slot: missing)
    image_shape: tuple[int, int, int]  # (H, W, C) of the statistics sample
    mean: list[float]  # per-channel statistics of the sample (0..1 scale)
    std: list[float]
    max_image_mb: float = 64.0  # the source's bound on one tar member


def check_stream(source: Source, where: str, data: DataConfig) -> None:
    """Validate a source's streaming options before anything is decoded; errors name the key."""
    if not isinstance(source, ShardsSource):
        return
    p = source.params
    for key, low in (("workers", 0), ("shuffle_buffer", 1), ("val_shards", 0)):
        if getattr(p, key) < low:
            raise ConfigError(f"{where}.{key}: expected >= {low}, got {getattr(p, key)}")
    if not p.stream:
        defaults = ShardsParams(p.path)
        used = [k for k in STREAM_ONLY if getattr(p, k) != getattr(defaults, k)]
        if used:
            raise ConfigError(f"{where}.{used[0]}: only used with {where}.stream: true")
        return
    if where != "data.source":
        raise ConfigError(f"{where}.stream: a streamed training split needs a single data.source; "
                          "multi-input data.sources are trained from memory")
    for key in ("limit_train", "drop_unlabelled"):
        if getattr(data, key):
            raise ConfigError(f"data.{key}: not available with {where}.stream: true (the whole training split "
                              "streams); remove it, or write a smaller training split")


def stream_of(source: Source, data: DataConfig, tasks: list[str], derive: dict[str, tuple[str, np.ndarray]],
              sample: ImageSet) -> Optional[ShardStream]:
    """The streamed training split of `source` (None unless it streams); `sample` is its decoded statistics
    sample, which gives the image shape and the normalisation statistics."""
    if not (isinstance(source, ShardsSource) and source.params.stream):
        return None
    p, index = source.params, source._index()
    train, _, _ = source.stream_splits(index)
    mean, std = channel_stats([sample.images])  # the sample: the first 5,000 streamed images
    return ShardStream(index.root, sum(s.samples for s in train), len(index.shards("train")) - len(train),
                       data.image_size, p.channels, data.channels, p.workers, p.shuffle_buffer, tasks, derive,
                       tuple(sample.images.shape[1:]), mean, std, p.max_image_mb)  # type: ignore[arg-type]


class StreamLoader:
    """Fixed-size uint8 training batches of a streamed split, in order, on the device (see the module docstring).

    `epochs` is the run's epoch count: the steps per epoch are the minimum over them, so they never change.
    """

    def __init__(self, spec: ShardStream, batch_size: int, seed: int, stream: int, augment: Optional[BatchAugment],
                 rank: int = 0, world_size: int = 1, device: torch.device = CPU, epochs: int = 1) -> None:
        self.spec, self.batch_size, self.seed, self.stream, self.augment = spec, batch_size, seed, stream, augment
        self.rank, self.device = rank, device
        self.reader = ShardReader(spec.root, "train", batch_size=batch_size, image_size=spec.image_size,
                                  channels=spec.channels, rank=rank, world_size=world_size, seed=seed,
                                  shuffle_buffer=spec.shuffle_buffer, drop_uneven=True, hold_out=spec.hold_out,
                                  max_image_mb=spec.max_image_mb)
        per_rank = min(self.samples_in(e) for e in range(epochs))
        self.natural_steps = per_rank // batch_size
        if self.natural_steps == 0:
            raise DataError(f"{spec.root}: each of {world_size} rank(s) reads {per_rank} training sample(s) in some "
                            f"epoch, fewer than data.batch_size {batch_size}; lower the batch size")
        self._maps = {name: (src, torch.from_numpy(table)) for name, (src, table) in spec.derive.items()}
        self._batches: Optional[Iterator[Batch]] = None
        self._next: Optional[tuple[int, int]] = None  # the (epoch, step) the open stream serves next
        self._params: Optional[torch.Tensor] = None

    def samples_in(self, epoch: int) -> int:
        """Samples this rank reads in `epoch`, before the cut to whole steps (equal on every rank)."""
        self.reader.set_epoch(epoch)
        return sum(n for _, n in self.reader.plan(max(1, self.spec.workers)))

    def batch(self, epoch: int, step: int, steps: int) -> Batch:
        """Batch `step` of `epoch`: step 0 starts the epoch's stream; any other step must follow the last one."""
        if steps != self.natural_steps:
            raise DataError(f"a streamed training split has {self.natural_steps} steps per epoch and cannot "
                            f"cycle to {steps}")
        if step == 0:
            self.close()
            self._batches = self._epoch(epoch)
            if self.augment is not None:
                g = keyed_generator(self.seed, self.stream, epoch, self.rank, -1)
                self._params = self.augment.draw(steps * self.batch_size, g).to(self.device)
        elif self._batches is None or self._next != (epoch, step):
            at = "not started" if self._next is None else f"at epoch {self._next[0] + 1} step {self._next[1] + 1}"
            raise DataError(f"streamed training batches come in order: asked for epoch {epoch + 1} step {step + 1}, "
                            f"but the stream is {at}; only step 1 may start an epoch")
        x, y = next(self._batches)
        self._next = (epoch, step + 1)
        if step + 1 == steps:
            self.close()  # the workers stop before validation
        x = x.to(self.device, non_blocking=True)
        y = {k: v.to(self.device, non_blocking=True) for k, v in y.items()}
        if self.augment is not None:
            x = self.augment(x, self._params[step * self.batch_size:(step + 1) * self.batch_size])
        return x, y

    def close(self) -> None:
        """End the open epoch's stream (and its DataLoader worker processes)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _epoch(self, epoch: int) -> Iterator[Batch]:
        """The epoch's batches, exactly `batch_size` each (re-batched across worker boundaries), on the CPU."""
        b = self.batch_size
        self.reader.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(  # its own generator: the global RNG stream is left alone
            self.reader, batch_size=None, num_workers=self.spec.workers, pin_memory=self.device.type == "cuda",
            generator=keyed_generator(self.seed, self.stream, epoch, self.rank, -3))
        held: list[Batch] = []  # rows not yet in a batch, in arrival order
        for x, y in loader:
            if not held and len(x) == b:
                yield self._finish(x, y)
                continue
            held.append((x, y))
            while sum(len(h[0]) for h in held) >= b:
                x = torch.cat([h[0] for h in held])
                y = {k: torch.cat([h[1][k] for h in held]) for k in held[0][1]}
                held = [(x[b:], {k: v[b:] for k, v in y.items()})] if len(x) > b else []
                yield self._finish(x[:b], {k: v[:b] for k, v in y.items()})

    def _finish(self, x: torch.Tensor, y: dict[str, torch.Tensor]) -> Batch:
        """Channel conversion (as the cache does it), derived tasks' labels, and only the tasks trained."""
        s = self.spec
        if s.out_channels not in (None, s.channels):
            x = torch.from_numpy(adapt_images(x.numpy(), None, s.out_channels))
        for name, (src, table) in self._maps.items():
            y[name] = table[y[src]]  # a missing label (-1) reads the table's last slot: missing
        return x, {k: y[k] for k in s.tasks}
