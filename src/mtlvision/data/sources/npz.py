"""`npz`: shards `SPLIT-*.npz` holding `images` (N,H,W,C uint8) and named label arrays.

Named label keys become tasks; class names come from the folder's `meta.json` when present. A task
can be derived by binning a numeric key (e.g. age -> age groups). Datasets with no official split
(UTKFace) are split by a fold column.

Labels must be integer class indices (-1 = missing): a non-integer value (1.5, NaN) is refused, naming
the task, key, file, row and value. A task's class count comes from its declaration (`classes` or
`num_classes`), else from meta.json, else from the largest training label, which is reported once
(`SourceData.warnings`) with the classes no training row has, so a stray value is seen.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ...errors import ConfigError, DataError
from ...tasks import MISSING, Task
from ..arrays import ImageSet, check_labels
from . import SOURCES, Source, SourceData, existing_path, listing


@dataclasses.dataclass
class NpzTask:
    key: Optional[str] = None  # label array; default: the task's name
    bins: Optional[list[float]] = None  # class i = bins[i] <= value < bins[i+1]; outside -> missing
    classes: Optional[list[str]] = None  # names of classes 0..K-1; default: meta.json names, else "0".."K-1"
    num_classes: Optional[int] = None  # K, when the classes need no names; default: meta.json, else inferred
    flip_ok: bool = True


@dataclasses.dataclass
class NpzParams:
    path: str
    tasks: Union[dict[str, NpzTask], list[str]]
    train_split: str = "train"
    test_split: str = "test"
    fold_key: Optional[str] = None  # split train_split's rows by this key instead of using test_split
    test_folds: list[int] = dataclasses.field(default_factory=lambda: [0])
    drop_key: Optional[str] = None  # drop rows where this key is true (e.g. is_duplicate)


@dataclasses.dataclass
class _Rows:
    """Where each row of a (possibly filtered) split comes from, for messages: `rows(i)` is "row R of FILE"."""

    files: list[tuple[Path, int]]  # the split's shards and their row counts, in order
    index: np.ndarray  # each row's position in the concatenated shards

    def take(self, keep: np.ndarray) -> "_Rows":
        return _Rows(self.files, self.index[keep])

    def __call__(self, i: int) -> str:
        ends = np.cumsum([n for _, n in self.files])
        g = int(self.index[i])
        k = int(np.searchsorted(ends, g, side="right"))
        return f"row {g - (int(ends[k - 1]) if k else 0)} of {self.files[k][0]}"


def _read_shards(root: Path, split: str) -> tuple[dict[str, np.ndarray], _Rows]:
    files = sorted(root.glob(f"{split}-*.npz"))
    if not files:
        raise DataError(f"{root}: no files {split}-*.npz (found: {sorted(p.name for p in root.glob('*.npz'))})")
    parts = []
    for f in files:
        try:
            with np.load(f) as z:
                parts.append({k: z[k] for k in z.files})
        except Exception as exc:  # zip/pickle errors vary by numpy version
            raise DataError(f"{f}: cannot read npz shard ({exc})") from None
        if "images" not in parts[-1]:
            raise DataError(f"{f}: has no 'images' array (keys: {sorted(parts[-1])})")
        images = parts[-1]["images"]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise DataError(f"{f}: 'images' is {images.dtype} {images.shape}; expected uint8 (N,H,W,C)")
        if set(parts[-1]) != set(parts[0]):
            raise DataError(f"{f}: keys {sorted(parts[-1])} differ from {files[0]}: {sorted(parts[0])}; "
                            "expected every shard of a split to hold the same arrays")
    counts = [len(part["images"]) for part in parts]
    raw = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return raw, _Rows(list(zip(files, counts)), np.arange(sum(counts)))


def read_split(root: Path, split: str) -> dict[str, np.ndarray]:
    """Every array of a split's shards, concatenated in file order."""
    return _read_shards(root, split)[0]


def _take(raw: dict[str, np.ndarray], rows: _Rows, keep: np.ndarray) -> tuple[dict[str, np.ndarray], _Rows]:
    return {k: v[keep] for k, v in raw.items()}, rows.take(keep)


def _kept(raw: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    """The rows where `raw[key]` is false (drop_key: e.g. duplicates are dropped)."""
    if key not in raw:
        raise DataError(f"{where}: drop_key {key!r} is not a key (keys: {sorted(raw)})")
    return ~raw[key].astype(bool)


def _read_meta(root: Path) -> dict[str, dict]:
    """`label_kinds` of meta.json (key -> {num_classes, names}); empty without the file."""
    path = root / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    kinds = meta.get("label_kinds", {}) if isinstance(meta, dict) else None
    if not isinstance(kinds, dict) or not all(isinstance(v, dict) for v in kinds.values()):
        raise DataError(f"{path}: expected {{\"label_kinds\": {{key: {{\"num_classes\": K, \"names\": [...]}}}}}}")
    return kinds


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

    def _classes(self, name: str, spec: NpzTask, info: dict, train: np.ndarray, at: str, rows: _Rows,
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

    def load(self) -> SourceData:
        p, w = self.params, self.where
        root = existing_path(p.path, f"{w}.path")
        meta = _read_meta(root)
        train_raw, train_rows = _read_shards(root, p.train_split)
        if p.fold_key:
            if p.fold_key not in train_raw:
                raise DataError(f"{root}: fold_key {p.fold_key!r} is not a key (keys: {sorted(train_raw)})")
            is_test = np.isin(train_raw[p.fold_key], p.test_folds)
            test_raw, test_rows = _take(train_raw, train_rows, is_test)
            train_raw, train_rows = _take(train_raw, train_rows, ~is_test)
        else:
            test_raw, test_rows = _read_shards(root, p.test_split)
        # where each split's rows come from (with fold_key, both from train_split), for messages
        where = {"train": f"{root}/{p.train_split}-*.npz",
                 "test": f"{root}/{p.train_split if p.fold_key else p.test_split}-*.npz"}
        if p.drop_key:
            train_raw, train_rows = _take(train_raw, train_rows, _kept(train_raw, p.drop_key, where["train"]))
            test_raw, test_rows = _take(test_raw, test_rows, _kept(test_raw, p.drop_key, where["test"]))
        tasks, train_labels, test_labels = [], {}, {}
        for name, spec in self._specs().items():
            key = spec.key or name
            if key not in train_raw:
                raise DataError(f"{w}.tasks.{name}: key {key!r} not in {root} "
                                f"(keys: {sorted(k for k in train_raw if k != 'images')})")
            if key not in test_raw:
                raise DataError(f"{w}.tasks.{name}: key {key!r} is in {where['train']} but not in "
                                f"{where['test']} (keys: {sorted(k for k in test_raw if k != 'images')})")
            at = f"{w}.tasks.{name}, key {key!r}"
            classes, conv = self._classes(name, spec, meta.get(key, {}), train_raw[key], at, train_rows)
            tasks.append(Task(name, list(classes), flip_ok=spec.flip_ok))
            for raw, rows, out in ((train_raw, train_rows, train_labels), (test_raw, test_rows, test_labels)):
                out[name] = check_labels(conv(raw[key]), len(classes), name, at, rows)
        return SourceData(tasks, ImageSet(train_raw["images"], train_labels),
                          ImageSet(test_raw["images"], test_labels), warnings=list(self.warnings))
