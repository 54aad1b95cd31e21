"""`shards`: a folder written by `mtlvision shards`, decoded once (each split's shards read in order).

With `stream: true` the training split is not decoded: `data/stream.py` streams it each epoch, and only
val, test and a statistics sample of the training split (its first `STATS_IMAGES` samples in stored order,
which the writer shuffled) go through the cache.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...errors import ConfigError, DataError
from ..arrays import ImageSet, check_labels
from ..decode import decode_all
from ..files import DEFAULT_MAX_IMAGE_MB
from ..shards import INDEX, ShardIndex, ShardInfo, read_samples
from . import SOURCES, Source, SourceData, existing_path

STATS_IMAGES = 5000  # streamed training split: images decoded (and cached) for the normalisation statistics
STREAM_ONLY = ("workers", "shuffle_buffer", "val_shards")  # options that mean something only with stream: true


@dataclasses.dataclass
class ShardsParams:
    path: str  # the shards folder: index.json + SPLIT-NNNNN.tar
    channels: int = 3
    skip_corrupt: bool = False  # decoded splits only (the writer already checked every image)
    stream: bool = False  # stream the training split each epoch instead of decoding it into the cache
    workers: int = 0  # streaming: DataLoader worker processes per rank (0: read in the training process)
    shuffle_buffer: int = 1000  # streaming: samples in each reader's shuffle buffer
    val_shards: int = 0  # streaming, shards without a val split: hold out the last K training shards as val
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB  # a larger shard member is refused without reading it


@SOURCES.register("shards", params=ShardsParams)
class ShardsSource(Source):
    """WebDataset-style tar shards written by `mtlvision shards` (index.json + SPLIT-NNNNN.tar)."""

    def _index(self) -> ShardIndex:
        return ShardIndex.load(existing_path(self.params.path, f"{self.where}.path"))

    def fingerprint(self) -> dict[str, Any]:
        """The decoded content's key: reader options are left out, and so are the streaming ones when not
        streaming (keys of in-memory runs stay what they were before streaming existed)."""
        fp = super().fingerprint()
        for key in ("workers", "shuffle_buffer") + (() if self.params.stream else ("stream", "val_shards")):
            fp["params"].pop(key)
        return fp

    def stream_splits(self, index: ShardIndex) -> tuple[list[ShardInfo], list[ShardInfo], str]:
        """Streaming: the training shards to stream, the validation shards and the split they come from
        (the shards' own val split, or the last `val_shards` training shards held out)."""
        p, train = self.params, index.shards("train")
        if "val" in index.splits:
            if p.val_shards:
                raise ConfigError(f"{self.where}.val_shards: {index.root} has its own val split; remove val_shards")
            return train, index.shards("val"), "val"
        if not p.val_shards:
            raise DataError(f"{index.root}: {self.where}.stream: true needs a validation split, and the shards have "
                            f"none (splits {sorted(index.splits)}); write one (`mtlvision shards ... --split all` "
                            f"from a source with a val split, e.g. a CSV split column), or set {self.where}."
                            "val_shards: K to hold out the last K training shards as validation (never streamed)")
        if p.val_shards >= len(train):
            raise DataError(f"{self.where}.val_shards: {p.val_shards} of the {len(train)} training shard(s) of "
                            f"{index.root} would leave none to stream")
        return train[:-p.val_shards], train[-p.val_shards:], f"train split, last {p.val_shards} shard(s)"

    def inputs(self) -> list[Path]:
        """The index and every shard it lists: the cache key covers their sizes and mtimes."""
        index = self._index()
        return [index.root / INDEX] + [index.root / s.file for shards in index.splits.values() for s in shards]

    def load(self) -> SourceData:
        p = self.params
        index = self._index()
        missing = [s for s in ("train", "test") if s not in index.splits]
        if missing:
            raise DataError(f"{index.root}: no {' or '.join(missing)} split (it has {sorted(index.splits)}); training "
                            "needs both: write them with `mtlvision shards ... --split all`")
        skipped: list[str] = []

        def decoded(shards: list[ShardInfo], split: str, limit: Optional[int] = None) -> ImageSet:
            samples = list(itertools.islice(read_samples(index, shards, self.size_limit()), limit))
            imgs, kept = decode_all([(where, lambda d=data: d) for where, data, _ in samples], self.image_size,
                                    p.channels, p.skip_corrupt, skipped, self.where)
            labels = {t.name: check_labels(np.array([samples[i][2][t.name] for i in kept], np.int64), t.num_classes,
                                           t.name, f"{index.root} ({split} split)") for t in index.tasks}
            return ImageSet(imgs, labels)

        if p.stream:  # train: only the statistics sample
            train, val, val_split = self.stream_splits(index)
            return SourceData(index.tasks, decoded(train, "train", STATS_IMAGES), decoded(index.shards("test"), "test"),
                              decoded(val, val_split), skipped=skipped)
        sets = {split: decoded(shards, split) for split, shards in index.splits.items()}
        return SourceData(index.tasks, sets["train"], sets["test"], sets.get("val"), skipped=skipped)
