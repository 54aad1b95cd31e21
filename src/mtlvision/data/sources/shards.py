"""`shards`: a folder written by `mtlvision shards`, decoded once (each split's shards read in order)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ...errors import DataError
from ..arrays import ImageSet, check_labels
from ..decode import decode_all
from ..shards import INDEX, ShardIndex, read_samples
from . import SOURCES, Source, SourceData, existing_path


@dataclasses.dataclass
class ShardsParams:
    path: str  # the shards folder: index.json + SPLIT-NNNNN.tar
    channels: int = 3
    skip_corrupt: bool = False


@SOURCES.register("shards", params=ShardsParams)
class ShardsSource(Source):
    """WebDataset-style tar shards written by `mtlvision shards` (index.json + SPLIT-NNNNN.tar)."""

    def _index(self) -> ShardIndex:
        return ShardIndex.load(existing_path(self.params.path, "data.source.path"))

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
        sets = {}
        for split, shards in index.splits.items():
            samples = list(read_samples(index, shards))
            imgs, kept = decode_all([(where, lambda d=data: d) for where, data, _ in samples], self.image_size,
                                    p.channels, p.skip_corrupt, skipped)
            labels = {t.name: check_labels(np.array([samples[i][2][t.name] for i in kept], np.int64), t.num_classes,
                                           t.name, f"{index.root} ({split} split)") for t in index.tasks}
            sets[split] = ImageSet(imgs, labels)
        return SourceData(index.tasks, sets["train"], sets["test"], sets.get("val"), skipped=skipped)
