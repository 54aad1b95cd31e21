"""`npz`: shards `PREFIX-*.npz` holding `images` (N,H,W,C uint8) and named label arrays.

Named label keys become tasks; class names come from the folder's `meta.json` when present. A task
can be derived by binning a numeric key (e.g. age -> age groups), or split into one task per group
(`group_by`, e.g. Omniglot's characters -> one task per alphabet; see npz_groups). A split may merge
several prefixes (`train_split: [background, evaluation]`). Datasets with no official split (UTKFace,
Omniglot's drawers) are split by the values of a fold column into train / val / test.

Labels must be integer class indices (-1 = missing): a non-integer value (1.5, NaN) is refused, naming
the task, key, file, row and value. A task's class count comes from its declaration (`classes` or
`num_classes`), else from meta.json, else from the largest training label, which is reported once
(`SourceData.warnings`) with the classes no training row has, so a stray value is seen.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ...errors import ConfigError, DataError
from ...tasks import MISSING, Task
from ..arrays import ImageSet, check_labels
from . import SOURCES, Source, SourceData, existing_path, listing
from .npz_files import Prefixes, Rows, Split, read_meta, read_shards, read_split  # noqa: F401 (read_split: multimnist)
from .npz_groups import grouped_tasks


@dataclasses.dataclass
class NpzTask:
    key: Optional[str] = None  # label array; default: the task's name
    bins: Optional[list[float]] = None  # class i = bins[i] <= value < bins[i+1]; outside -> missing
    classes: Optional[list[str]] = None  # names of classes 0..K-1; default: meta.json names, else "0".."K-1"
    num_classes: Optional[int] = None  # K, when the classes need no names; default: meta.json, else inferred
    flip_ok: bool = True
    group_by: Optional[str] = None  # one task per value of this key, classifying `key` within the group
    groups: Optional[list[Union[int, str]]] = None  # with group_by: the groups (values or meta.json names)


@dataclasses.dataclass
class NpzParams:
    path: str
    tasks: Union[dict[str, NpzTask], list[str]]
    train_split: Prefixes = "train"  # file prefix(es): PREFIX-*.npz, several merged in order
    test_split: Prefixes = "test"
    fold_key: Optional[str] = None  # split train_split's rows by this key's values instead of using test_split
    test_folds: list[int] = dataclasses.field(default_factory=lambda: [0])
    val_folds: list[int] = dataclasses.field(default_factory=list)  # default: data.val_fraction of train
    train_folds: Optional[list[int]] = None  # default: every value in neither test_folds nor val_folds
    drop_key: Optional[str] = None  # drop rows where this key is true (e.g. is_duplicate)


def _kept(split: Split, key: str) -> np.ndarray:
    """The rows where `key` is false (drop_key: e.g. duplicates are dropped)."""
    if key not in split.raw:
        raise DataError(f"{split.where}: drop_key {key!r} is not a key (keys: {sorted(split.raw)})")
    return ~split.raw[key].astype(bool)


def _bin_labels(values: np.ndarray, bins: list[float]) -> np.ndarray:
    idx = np.digitize(values, bins) - 1
    return np.where((idx < 0) | (idx >= len(bins) - 1), MISSING, idx)


def _same(values: np.ndarray) -> np.ndarray:
    return values


@SOURCES.register("npz", params=NpzParams)
class NpzSource(Source):
    """npz shards (MNIST, Fashion-MNIST, Omniglot, UTKFace): label keys become tasks."""

    def inputs(self) -> list[Path]:
        return [existing_path(self.params.path, f"{self.where}.path")]

    def _specs(self) -> dict[str, NpzTask]:
        t = self.params.tasks
        return {name: NpzTask() for name in t} if isinstance(t, list) else t

    def _classes(self, name: str, spec: NpzTask, info: dict, train: np.ndarray, at: str, rows: Rows,
                 ) -> tuple[list[str], Callable[[np.ndarray], np.ndarray]]:
        """A task's class names and the map from its key's values to class indices (`at` names task and key)."""
        key = f"{self.where}.tasks.{name}"
        if spec.num_classes is not None and spec.bins:
            raise ConfigError(f"{key}.num_classes: not used with bins (each bin is a class)")
        if spec.classes is not None and spec.num_classes is not None and len(spec.classes) != spec.num_classes:
            raise ConfigError(f"{key}: num_classes is {spec.num_classes} but classes names {len(spec.classes)}")
        if spec.bins:
            if any(b >= c for b, c in zip(spec.bins, spec.bins[1:])):
                raise ConfigError(f"{key}.bins: expected strictly increasing edges, got {spec.bins}")
            if spec.classes and len(spec.classes) != len(spec.bins) - 1:
                raise DataError(f"{key}: {len(spec.bins) - 1} bins but {len(spec.classes)} classes")
            classes = spec.classes or [f"{lo:g}-{hi:g}" for lo, hi in zip(spec.bins, spec.bins[1:])]
            return classes, lambda v: _bin_labels(v.astype(np.float64), spec.bins)
        names, n = info.get("names"), spec.num_classes or info.get("num_classes")
        if spec.num_classes is not None and spec.classes is None and names and len(names) != spec.num_classes:
            raise DataError(f"{key}: num_classes is {spec.num_classes} but meta.json names {len(names)} classes")
        if spec.classes or names or n:
            return list(spec.classes or names or [str(i) for i in range(n)]), _same
        values = check_labels(train, None, name, at, rows)
        n = int(values.max()) + 1 if len(values) else 0
        empty = np.flatnonzero(np.bincount(values[values >= 0], minlength=n) == 0)
        gaps = f"{len(empty)} of them have no training rows: {listing([str(c) for c in empty], 10)}; " if len(
            empty) else ""
        self.warn(f"{at}: {n} classes (0..{n - 1}) inferred from the largest training label; {gaps}declare "
                  f"{key}.num_classes (or classes) to refuse any other value")
        return [str(i) for i in range(n)], _same

    def _splits(self, root: Path) -> dict[str, Split]:
        """train and test (and val with val_folds) as read, fold-split and filtered by drop_key; none empty."""
        p, w = self.params, self.where
        train = read_shards(root, p.train_split)
        if p.fold_key is None:
            for opt, given in (("val_folds", bool(p.val_folds)), ("train_folds", p.train_folds is not None)):
                if given:
                    raise ConfigError(f"{w}.{opt}: needs fold_key (the key whose values the folds are)")
            splits = {"train": train, "test": read_shards(root, p.test_split)}
        else:
            splits = _fold_splits(train, p, w)
        if p.drop_key:
            splits = {s: sp.take(_kept(sp, p.drop_key)) for s, sp in splits.items()}
        for s, sp in splits.items():
            if not len(sp):
                dropped = f" once drop_key {p.drop_key!r} dropped rows" if p.drop_key else ""
                raise DataError(f"{w}: the {s} split ({_rows_of(s, sp, p)}) has no rows{dropped}")
        return splits

    def load(self) -> SourceData:
        p, w = self.params, self.where
        root = existing_path(p.path, f"{w}.path")
        meta = read_meta(root)
        splits = self._splits(root)
        train = splits["train"]
        tasks: list[Task] = []
        labels: dict[str, dict[str, np.ndarray]] = {s: {} for s in splits}
        made: dict[str, str] = {}  # task -> the spec that made it
        for name, spec in self._specs().items():
            key = spec.key or name
            if key not in train.raw:
                raise DataError(f"{w}.tasks.{name}: key {key!r} not in {root} "
                                f"(keys: {sorted(k for k in train.raw if k != 'images')})")
            for sp in splits.values():
                if key not in sp.raw:
                    raise DataError(f"{w}.tasks.{name}: key {key!r} is in {train.where} but not in "
                                    f"{sp.where} (keys: {sorted(k for k in sp.raw if k != 'images')})")
            at = f"{w}.tasks.{name}, key {key!r}"
            if spec.group_by is not None:
                made_here = grouped_tasks(name, spec, key, meta, splits, f"{w}.tasks.{name}", self.warn)
            else:
                if spec.groups is not None:
                    raise ConfigError(f"{w}.tasks.{name}.groups: needs group_by (the key whose values are groups)")
                classes, conv = self._classes(name, spec, meta.get(key, {}), train.raw[key], at, train.rows)
                made_here = [(Task(name, list(classes), flip_ok=spec.flip_ok),
                              {s: check_labels(conv(sp.raw[key]), len(classes), name, at, sp.rows)
                               for s, sp in splits.items()})]
            for task, per_split in made_here:
                if task.name in made:
                    raise ConfigError(f"{w}.tasks.{name}: makes task {task.name!r}, which "
                                      f"{w}.tasks.{made[task.name]} makes too")
                made[task.name] = name
                tasks.append(task)
                for s in splits:
                    labels[s][task.name] = per_split[s]
        sets = {s: ImageSet(sp.raw["images"], labels[s]) for s, sp in splits.items()}
        return SourceData(tasks, sets["train"], sets["test"], val=sets.get("val"), warnings=list(self.warnings))


def _fold_splits(train: Split, p: NpzParams, w: str) -> dict[str, Split]:
    """train_split's rows split by the values of `fold_key` into train, test and (with val_folds) val."""
    if p.fold_key not in train.raw:
        raise DataError(f"{train.where}: fold_key {p.fold_key!r} is not a key (keys: {sorted(train.raw)})")
    values = train.raw[p.fold_key]
    present = np.unique(values)
    folds = {"test_folds": p.test_folds, "val_folds": p.val_folds}
    if p.train_folds is not None:
        folds["train_folds"] = p.train_folds
    for opt, wanted in folds.items():
        absent = [v for v in wanted if v not in present]
        if absent:
            raise DataError(f"{w}.{opt}: {p.fold_key!r} has no row with {_values(absent)} in {train.where} "
                            f"(values: {listing([str(v) for v in present.tolist()], 12)})")
    names = list(folds)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = sorted(set(folds[a]) & set(folds[b]))
            if both:
                raise ConfigError(f"{w}.{a} and {w}.{b} both name fold(s) {both}; a row belongs to one split")
    is_test, is_val = np.isin(values, p.test_folds), np.isin(values, p.val_folds)
    is_train = np.isin(values, p.train_folds) if p.train_folds is not None else ~(is_test | is_val)
    splits = {"train": train.take(is_train), "test": train.take(is_test)}
    if p.val_folds:
        splits["val"] = train.take(is_val)
    return splits


def _rows_of(name: str, split: Split, p: NpzParams) -> str:
    """Which rows make split `name`, for messages: its folds, or its files."""
    if p.fold_key is None:
        return split.where
    if name == "train":
        return f"train_folds {p.train_folds}" if p.train_folds is not None else (
            "the fold values in neither test_folds nor val_folds")
    return f"{name}_folds {p.val_folds if name == 'val' else p.test_folds}"


def _values(values: list[int]) -> str:
    return f"value {values[0]}" if len(values) == 1 else f"values {values}"
