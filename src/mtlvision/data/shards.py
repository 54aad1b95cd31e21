"""Sharded streaming format: WebDataset-style tar shards, for image sets too large to decode into memory.

Layout of a shards folder (written by `write_shards`, i.e. `mtlvision shards`):

- `SPLIT-NNNNN.tar` (split = train, val or test): plain (uncompressed) tars. Each sample is two members
  with one key, `KEY.EXT` then `KEY.json`: the image file's bytes exactly as found (never re-encoded; EXT
  names the bytes' real format: jpg, png, ...), and `{"labels": {task: class index or -1}, "source": file}`.
  KEY is `SPLIT-NNNNNNNN`, the sample's position in the split's shuffled order, so `webdataset` groups the
  members into samples as usual.
- `index.json`: format name and version, the tasks (with class names), the seed, and per split its
  sample count and, per shard, file name, sample count and size in bytes. It is written atomically after
  every shard is complete: a folder without it is incomplete and every reader refuses it. A shard it names
  must be a plain file name in the folder: an absolute path, a folder, `..` or a link leading out of the
  folder is refused.

Reading never trusts a shard's tar headers: a member larger than `max_image_mb`, a sparse member, a link,
device or fifo is refused naming the shard and member (`files.tar_members`), and labels must be integers.

Samples of a split are shuffled (seeded) before being cut into shards, so each shard mixes classes.

Modules: the index and its checks are in `shard_index.py`, the writer in `shard_writer.py`, the reader here
(this module re-exports all three).

Reading (`ShardReader`): rank r of N takes shards r::N of the epoch's shard order (a permutation seeded by
(seed, epoch), equal on every rank); DataLoader worker w of W then takes every W-th of those. Samples pass
a shuffle buffer seeded by (seed, epoch, rank, worker) and come out as uint8 batches. With the default
`drop_uneven=False`, every sample appears exactly once per epoch across all ranks x workers; when the
shards do not divide evenly, some readers get a shard more (and the last shard of a split may be short),
so ranks can run different numbers of steps. `drop_uneven=True` caps each worker slot at the smallest
sample count that slot has on any rank (computed from the index, identically everywhere): every rank runs
the same number of steps, each sample appears at most once per epoch, and the few samples dropped change
from epoch to epoch with the shard order and the shuffle.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import tarfile
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from ..errors import DataError
from ..rng import keyed_generator
from ..tasks import MISSING, Task
from .decode import decode
from .files import DEFAULT_MAX_IMAGE_MB, SizeLimit, tar_members
from .shard_index import FORMAT, INDEX, SPLITS, VERSION, ShardIndex, ShardInfo
from .shard_writer import DEFAULT_SHARD_SIZE, write_shards

__all__ = ["DEFAULT_SHARD_SIZE", "FORMAT", "INDEX", "SPLITS", "VERSION", "Sample", "ShardIndex", "ShardInfo",
           "ShardReader", "read_samples", "write_shards"]

Sample = tuple[str, bytes, dict[str, int]]  # where (for messages), encoded image, labels


def read_samples(index: ShardIndex, shards: Iterable[ShardInfo], limit: SizeLimit = SizeLimit(),
                 ) -> Iterator[Sample]:
    """(where, encoded image, labels) of every sample of `shards`, in stored order, streaming each tar; a member
    over `limit` bytes is refused unread."""
    names = [t.name for t in index.tasks]
    for info in shards:
        path = index.root / info.file
        count = 0
        try:
            members = ((m, read) for m, read in tar_members(path, limit, stream=True) if m.isfile())
            for key, group in itertools.groupby(members, key=lambda mr: mr[0].name.split(".", 1)[0]):
                parts = {m.name.split(".", 1)[1] if "." in m.name else "": read() for m, read in group}
                where = f"{path} sample {key}"
                meta, images = parts.pop("json", None), list(parts.items())
                if meta is None or len(images) != 1:
                    raise DataError(f"{where}: expected one image and one .json member, got {sorted(parts)}"
                                    f"{'' if meta is None else ' + json'}")
                try:
                    labels = json.loads(meta)["labels"]
                    labels = {t: labels.get(t, MISSING) for t in names}
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise DataError(f"{where}: bad .json ({type(exc).__name__}: {exc})") from None
                bad = [t for t, v in labels.items() if not isinstance(v, int) or isinstance(v, bool)]
                if bad:
                    raise DataError(f"{where}: task {bad[0]!r} label {labels[bad[0]]!r} is not an integer class "
                                    "index (-1 for missing)")
                count += 1
                yield where, images[0][1], labels
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DataError(f"{path}: cannot read shard ({type(exc).__name__}: {exc})") from None
        if count != info.samples:
            raise DataError(f"{path}: has {count} samples, but {INDEX} says {info.samples}")


def _shuffled(samples: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """A shuffle buffer: each incoming sample takes the place of a uniformly chosen buffered one."""
    buf: list[Sample] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = rng.randrange(size)
        buf[j], s = s, buf[j]
        yield s
    rng.shuffle(buf)
    yield from buf


class ShardReader(torch.utils.data.IterableDataset):
    """Shuffled uint8 batches of one split, streamed from shards; ready for `DataLoader(reader, batch_size=None)`.

    Yields `(images, labels)`: images uint8 (B, H, W, C), or (B, C, H, W) with `channels_first`; labels
    {task: int64 (B,)}, -1 = missing. Call `set_epoch(e)` before each epoch (workers must not be persistent,
    so they see it). Each worker ends with one short batch unless `drop_last`. See the module docstring for
    how shards are split across ranks and workers and what `drop_uneven` guarantees. `hold_out` leaves the
    split's last shards out (a validation split held out by whole shards, see `data.source.val_shards`).
    A shard member (image or label file) over `max_image_mb` is refused without being read.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", *, batch_size: int = 128,
                 image_size: Optional[int] = None, channels: int = 3, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000, drop_uneven: bool = False,
                 drop_last: bool = False, channels_first: bool = False, hold_out: int = 0,
                 max_image_mb: float = DEFAULT_MAX_IMAGE_MB) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} of world size {world_size}: expected 0 <= rank < world_size")
        if batch_size < 1 or shuffle_buffer < 1 or channels not in (1, 3):
            raise DataError(f"batch_size {batch_size} and shuffle_buffer {shuffle_buffer}: expected >= 1; "
                            f"channels {channels}: expected 1 or 3")
        self.limit = SizeLimit(max_image_mb, "max_image_mb")
        self.index = ShardIndex.load(root)
        shards = self.index.shards(split)
        if not 0 <= hold_out < len(shards):
            raise DataError(f"hold_out {hold_out}: expected 0 <= hold_out < {len(shards)} ({split} shards)")
        self.split, self.shards = split, shards[:len(shards) - hold_out]
        self.batch_size, self.image_size, self.channels = batch_size, image_size, channels
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.shuffle_buffer = shuffle, shuffle_buffer
        self.drop_uneven, self.drop_last, self.channels_first = drop_uneven, drop_last, channels_first
        self.epoch = 0

    @property
    def tasks(self) -> list[Task]:
        return self.index.tasks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, num_workers: int = 1) -> list[tuple[list[ShardInfo], int]]:
        """Per worker of this rank, in this epoch: its shards and how many samples it yields."""
        n, readers = len(self.shards), self.world_size * num_workers
        if n < readers:
            raise DataError(f"{self.index.root}: the {self.split} split has {n} shard(s), fewer than "
                            f"{self.world_size} rank(s) x {num_workers} worker(s) = {readers}; write smaller "
                            "shards (mtlvision shards --shard-size) or use fewer workers")
        order = (torch.randperm(n, generator=keyed_generator(self.seed, self.epoch)).tolist() if self.shuffle
                 else list(range(n)))

        def slot(rank: int, worker: int) -> list[ShardInfo]:
            return [self.shards[i] for i in order[rank::self.world_size][worker::num_workers]]

        mine = [slot(self.rank, w) for w in range(num_workers)]
        if not self.drop_uneven:
            return [(s, sum(x.samples for x in s)) for s in mine]
        return [(s, min(sum(x.samples for x in slot(r, w)) for r in range(self.world_size)))
                for w, s in enumerate(mine)]

    def num_batches(self, num_workers: int = 1) -> int:
        """Batches this rank yields in the current epoch (equal on every rank with `drop_uneven`)."""
        rnd = math.floor if self.drop_last else math.ceil
        return sum(rnd(n / self.batch_size) for _, n in self.plan(num_workers))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        info = torch.utils.data.get_worker_info()
        return self.worker_batches(*((info.id, info.num_workers) if info is not None else (0, 1)))

    def worker_batches(self, worker: int, num_workers: int,
                       ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """The batches of one worker of this rank (what `__iter__` yields inside DataLoader worker `worker`)."""
        shards, quota = self.plan(num_workers)[worker]
        samples = read_samples(self.index, shards, self.limit)
        if self.shuffle:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")  # str seeds: same in every process
            samples = _shuffled(samples, self.shuffle_buffer, rng)
        batch: list[Sample] = []
        for s in itertools.islice(samples, quota):
            batch.append(s)
            if len(batch) == self.batch_size:
                yield self._collate(batch)
                batch = []
        if batch and not self.drop_last:
            yield self._collate(batch)

    def _collate(self, batch: list[Sample]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        arrays = [decode(data, self.image_size, self.channels, where) for where, data, _ in batch]
        for (where, _, _), a in zip(batch, arrays):
            if a.shape != arrays[0].shape:
                raise DataError(f"{where}: image is {a.shape[1]}x{a.shape[0]}, but {batch[0][0]} is "
                                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; give image_size to resize")
        images = torch.from_numpy(np.stack(arrays))
        if self.channels_first:
            images = images.permute(0, 3, 1, 2).contiguous()
        labels = {t.name: torch.tensor([lab[t.name] for _, _, lab in batch], dtype=torch.int64) for t in self.tasks}
        return images, labels
