"""From the data config to input groups: source(s) -> cache -> derived tasks -> train/val/test splits."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import Config, DeriveConfig
from ..errors import ConfigError, DataError
from ..tasks import MISSING, Task
from ..registry import SOURCES, Spec
from .arrays import ImageSet, channel_stats
from .cache import default_cache_root, load_source
from .sources import Source, SourceData
from .stream import ShardStream, check_stream, stream_of


@dataclasses.dataclass
class InputGroup:
    """One input group: the images of one source and the tasks they label (one group unless multi-input)."""

    name: str
    tasks: list[str]
    train: Optional[ImageSet]  # None when the training split streams from shards (`streamed`)
    val: ImageSet
    test: ImageSet
    flip: bool  # horizontal flips keep every task's label valid
    streamed: Optional[ShardStream] = None

    @property
    def train_size(self) -> int:
        return len(self.train) if self.streamed is None else self.streamed.samples

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:]) if self.streamed is None else self.streamed.image_shape

    def split(self, name: str) -> ImageSet:
        """The decoded split `name` (train, val or test); a streamed training split is not decoded."""
        if name == "train" and self.streamed is not None:
            raise DataError(f"the {self.name} input's training split is streamed from {self.streamed.root}, not "
                            "decoded (data.source.stream: true); use the val or test split")
        return getattr(self, name)


@dataclasses.dataclass
class DataBundle:
    tasks: list[Task]
    groups: list[InputGroup]
    mean: list[float]  # per-channel statistics of the training images (0..1 scale)
    std: list[float]
    skipped: list[str]  # unreadable files skipped (skip_corrupt)
    warnings: list[str] = dataclasses.field(default_factory=list)  # what the sources ignored, said once

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.groups[0].image_shape  # type: ignore[return-value]

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)


def _derive(data: SourceData, name: str, spec: DeriveConfig) -> np.ndarray:
    """Add task `name` to `data`; returns its class map from the source task (last slot: missing -> missing)."""
    if name in [t.name for t in data.tasks]:
        raise ConfigError(f"data.derive.{name}: the source already has a task named {name!r}; "
                          "give the derived task another name")
    src = next(t for t in data.tasks if t.name == spec.source)
    mapping = np.full(src.num_classes + 1, MISSING, np.int64)  # last slot maps MISSING -> MISSING
    owner: dict[str, str] = {}  # class -> the group that lists it
    for gi, (group, members) in enumerate(spec.groups.items()):
        for m in members:
            if m not in src.classes:
                raise ConfigError(f"data.derive.{name}.groups.{group}: {m!r} is not a class of "
                                  f"{spec.source!r} (classes: {src.classes})")
            if m in owner:
                raise ConfigError(f"data.derive.{name}.groups: class {m!r} is in both {owner[m]!r} and "
                                  f"{group!r}; expected each class in at most one group")
            owner[m] = group
            mapping[src.classes.index(m)] = gi
    data.tasks.append(Task(name, list(spec.groups), flip_ok=spec.flip_ok and src.flip_ok))
    for split in (data.train, data.val, data.test):
        if split is not None:
            split.labels[name] = mapping[split.labels[spec.source]]
    return mapping


def _split_val(train: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """A seeded random `fraction` of train (checked in (0, 1) by the config) becomes the validation split."""
    perm = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(len(train) * fraction)))
    if n_val >= len(train):
        raise DataError(f"training set has {len(train)} image(s): too few to carve a validation split")
    return train.subset(np.sort(perm[n_val:])), train.subset(np.sort(perm[:n_val]))


def _labelled_only(data: SourceData, tasks: list[str]) -> SourceData:
    """`data` without the rows that none of `tasks` labels (data.drop_unlabelled)."""
    out = {}
    for split in ("train", "val", "test"):
        s = getattr(data, split)
        if s is not None:
            labelled = np.any(np.stack([s.labels[t] != MISSING for t in tasks]), axis=0)
            out[split] = s if labelled.all() else s.subset(np.flatnonzero(labelled))
    return dataclasses.replace(data, **out)


def _limit(s: ImageSet, n: Optional[int], seed: int) -> ImageSet:
    if n is None or n >= len(s):
        return s
    return s.subset(np.sort(np.random.default_rng(seed).permutation(len(s))[:n]))


def _load(spec: Spec, cfg: Config) -> tuple[SourceData, Source]:
    where = spec.where
    source = SOURCES.build(spec, image_size=cfg.data.image_size, where=spec.where)
    check_stream(source, where, cfg.data)
    root = None
    if cfg.data.cache:
        root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_root()
    return load_source(spec.name, source, cfg.data.image_size, cfg.data.channels, root), source


def build_data(cfg: Config) -> DataBundle:
    """Build every input group named by the config, apply task overrides, and carve validation splits."""
    d = cfg.data
    specs = d.source_specs()
    tasks: list[Task] = []
    groups: list[InputGroup] = []
    skipped: list[str] = []
    warnings: list[str] = []
    known: set[str] = set()  # every task of every source, derived and disabled ones included
    for group_name, spec in specs.items():
        where = spec.where
        data, source = _load(spec, cfg)
        maps = {}  # derived task -> (source task, class map), in order: a streamed split maps each batch
        for name, dspec in d.derive.items():
            if dspec.source in [t.name for t in data.tasks]:
                maps[name] = (dspec.source, _derive(data, name, dspec))
        names = [t.name for t in data.tasks]
        clash = sorted(set(names) & {t.name for t in tasks})
        if clash:
            raise ConfigError(f"{where}: task name(s) {clash} already come from another source")
        known.update(names)
        for t in data.tasks:
            o = cfg.tasks.get(t.name)
            if o is not None:
                t.label_smoothing = o.label_smoothing
        active = [t for t in data.tasks if cfg.tasks.get(t.name) is None or cfg.tasks[t.name].enabled]
        if not active:
            continue
        keep = [t.name for t in active]
        if d.drop_unlabelled:
            data = _labelled_only(data, keep)
        # streamed: the source gives a val split, and its `train` is only the statistics sample
        train, val = (data.train, data.val) if data.val is not None else _split_val(
            data.train, d.val_fraction, cfg.seed)
        train, test = _limit(train, d.limit_train, cfg.seed), _limit(data.test, d.limit_test, cfg.seed)
        sets = {}
        for split, s in (("train", train), ("validation", val), ("test", test)):
            if len(s) == 0:
                raise DataError(f"{where}: the {split} split is empty")
            sets[split] = ImageSet(s.images, {k: s.labels[k] for k in keep})
        streamed = stream_of(source, d, keep, maps, sets["train"])
        groups.append(InputGroup(group_name, keep, sets["train"] if streamed is None else None, sets["validation"],
                              sets["test"], flip=all(t.flip_ok for t in active), streamed=streamed))
        tasks.extend(active)
        skipped.extend(data.skipped)
        warnings.extend(f"{where}: {w}" for w in data.warnings)
    for name, dspec in d.derive.items():
        if dspec.source not in known:
            raise ConfigError(f"data.derive.{name}.source: no task {dspec.source!r} (tasks: {sorted(known)})")
    unknown = sorted(set(cfg.tasks) - known)
    if unknown:
        raise ConfigError(f"tasks: unknown task(s) {unknown}; the data provides {sorted(known)}")
    if not tasks:
        raise ConfigError("tasks: every task is disabled; enable at least one")
    shapes = {g.name: g.image_shape for g in groups}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"multi-input sources have different image shapes {shapes}; "
                          "set data.image_size and data.channels to adapt them to one spec")
    if groups[0].streamed is not None:  # a streamed training split is the only input group
        mean, std = groups[0].streamed.mean, groups[0].streamed.std
    else:
        mean, std = channel_stats([g.train.images for g in groups])
    return DataBundle(tasks, groups, mean, std, skipped, warnings)
