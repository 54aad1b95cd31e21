"""From the data config to input streams: source(s) -> cache -> derived tasks -> train/val/test."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..config import Config, DeriveConfig
from ..errors import ConfigError, DataError
from ..tasks import MISSING, Task
from .arrays import ImageSet
from .cache import default_cache_root, load_source
from ..registry import SOURCES, Spec
from .sources import Source, SourceData
from .stream import ShardStream, check_stream, stream_of


@dataclasses.dataclass
class Stream:
    """One input stream: images feeding a group of tasks (one stream unless multi-input)."""

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
            raise DataError(f"the {self.name} stream's training split is streamed from {self.streamed.root}, not "
                            "decoded (data.source.stream: true); use the val or test split")
        return getattr(self, name)


@dataclasses.dataclass
class DataBundle:
    tasks: list[Task]
    streams: list[Stream]
    mean: list[float]
    std: list[float]
    skipped: list[str]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.streams[0].image_shape  # type: ignore[return-value]

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
    if not 0 < fraction < 1:
        raise ConfigError(f"data.val_fraction: expected a value in (0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(len(train))
    n_val = max(1, int(round(len(train) * fraction)))
    if n_val >= len(train):
        raise DataError(f"training set has {len(train)} image(s): too few to carve a validation split")
    return train.subset(np.sort(perm[n_val:])), train.subset(np.sort(perm[:n_val]))


def _limit(s: ImageSet, n: Optional[int], seed: int) -> ImageSet:
    if n is None or n >= len(s):
        return s
    return s.subset(np.sort(np.random.default_rng(seed).permutation(len(s))[:n]))


def _load(spec: Spec, cfg: Config) -> tuple[SourceData, Source]:
    where = spec.where
    source = SOURCES.build(spec, image_size=cfg.data.image_size)
    check_stream(source, where, cfg.data)
    root = None
    if cfg.data.cache:
        root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_root()
    return load_source(spec.name, source, cfg.data.image_size, cfg.data.channels, root), source


def build_data(cfg: Config) -> DataBundle:
    """Build every stream named by the config, apply task overrides, and carve validation splits."""
    d = cfg.data
    specs = d.source_specs()
    tasks: list[Task] = []
    streams: list[Stream] = []
    skipped: list[str] = []
    known: set[str] = set()  # every task of every source, derived and disabled ones included
    for stream_name, spec in specs.items():
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
        # streamed: the source gives a val split, and its `train` is only the statistics sample
        train, val = (data.train, data.val) if data.val is not None else _split_val(
            data.train, d.val_fraction, cfg.seed)
        train, test = _limit(train, d.limit_train, cfg.seed), _limit(data.test, d.limit_test, cfg.seed)
        keep = [t.name for t in active]
        sets = {}
        for split, s in (("train", train), ("validation", val), ("test", test)):
            if len(s) == 0:
                raise DataError(f"{where}: the {split} split is empty")
            sets[split] = ImageSet(s.images, {k: s.labels[k] for k in keep})
        streamed = stream_of(source, d, keep, maps, sets["train"])
        streams.append(Stream(stream_name, keep, sets["train"] if streamed is None else None, sets["validation"],
                              sets["test"], flip=all(t.flip_ok for t in active), streamed=streamed))
        tasks.extend(active)
        skipped.extend(data.skipped)
    for name, dspec in d.derive.items():
        if dspec.source not in known:
            raise ConfigError(f"data.derive.{name}.source: no task {dspec.source!r} (tasks: {sorted(known)})")
    unknown = sorted(set(cfg.tasks) - known)
    if unknown:
        raise ConfigError(f"tasks: unknown task(s) {unknown}; the data provides {sorted(known)}")
    if not tasks:
        raise ConfigError("tasks: every task is disabled; enable at least one")
    shapes = {s.name: s.image_shape for s in streams}
    if len(set(shapes.values())) > 1:
        raise ConfigError(f"multi-input sources have different image shapes {shapes}; "
                          "set data.image_size and data.channels to adapt them to one spec")
    if streams[0].streamed is not None:  # a streamed split is the only stream
        mean, std = streams[0].streamed.mean, streams[0].streamed.std
    else:
        mean, std = _channel_stats([s.train for s in streams])
    return DataBundle(tasks, streams, mean, std, skipped)


def _channel_stats(sets: list[ImageSet], max_images: int = 5000) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (0..1 scale) from up to `max_images` training images of each stream."""
    total, sq, count = 0.0, 0.0, 0
    for s in sets:
        step = max(1, len(s) // max_images)  # strided: files are often sorted by class
        x = np.asarray(s.images[::step][:max_images], np.float64) / 255
        x = x.reshape(-1, x.shape[-1])
        total, sq, count = total + x.sum(0), sq + (x**2).sum(0), count + len(x)
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-6))
    return mean.tolist(), std.tolist()
