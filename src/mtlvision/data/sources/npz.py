"""`npz`: shards `SPLIT-*.npz` holding `images` (N,H,W,C uint8) and named label arrays.

Named label keys become tasks; class names come from the folder's `meta.json` when present. A task
can be derived by binning a numeric key (e.g. age -> age groups). Datasets with no official split
(UTKFace) are split by a fold column.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Union

import numpy as np

from ...errors import ConfigError, DataError
from ...tasks import MISSING, Task
from ..arrays import ImageSet, check_labels
from . import SOURCES, Source, SourceData, existing_path


@dataclasses.dataclass
class NpzTask:
    key: Optional[str] = None  # label array; default: the task's name
    bins: Optional[list[float]] = None  # class i = bins[i] <= value < bins[i+1]; outside -> missing
    classes: Optional[list[str]] = None  # default: meta.json names, else "0".."K-1"
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


def read_split(root: Path, split: str) -> dict[str, np.ndarray]:
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
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _drop_rows(raw: dict[str, np.ndarray], key: str, where: str) -> dict[str, np.ndarray]:
    """Remove the rows where `raw[key]` is true (e.g. duplicates)."""
    if key not in raw:
        raise DataError(f"{where}: drop_key {key!r} is not a key (keys: {sorted(raw)})")
    keep = ~raw[key].astype(bool)
    return {k: v[keep] for k, v in raw.items()}


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


@SOURCES.register("npz", params=NpzParams)
class NpzSource(Source):
    """npz shards (MNIST, Fashion-MNIST, Omniglot, UTKFace): label keys become tasks."""

    def inputs(self) -> list[Path]:
        return [existing_path(self.params.path, "data.source.path")]

    def _specs(self) -> dict[str, NpzTask]:
        t = self.params.tasks
        return {name: NpzTask() for name in t} if isinstance(t, list) else t

    def load(self) -> SourceData:
        p = self.params
        root = existing_path(p.path, "data.source.path")
        meta = _read_meta(root)
        train_raw = read_split(root, p.train_split)
        if p.fold_key:
            if p.fold_key not in train_raw:
                raise DataError(f"{root}: fold_key {p.fold_key!r} is not a key (keys: {sorted(train_raw)})")
            is_test = np.isin(train_raw[p.fold_key], p.test_folds)
            test_raw = {k: v[is_test] for k, v in train_raw.items()}
            train_raw = {k: v[~is_test] for k, v in train_raw.items()}
        else:
            test_raw = read_split(root, p.test_split)
        # where each split's rows come from (with fold_key, both from train_split), for messages
        where = {"train": f"{root}/{p.train_split}-*.npz",
                 "test": f"{root}/{p.train_split if p.fold_key else p.test_split}-*.npz"}
        if p.drop_key:
            train_raw = _drop_rows(train_raw, p.drop_key, where["train"])
            test_raw = _drop_rows(test_raw, p.drop_key, where["test"])
        tasks, train_labels, test_labels = [], {}, {}
        for name, spec in self._specs().items():
            key = spec.key or name
            if key not in train_raw:
                raise DataError(f"data.source.tasks.{name}: key {key!r} not in {root} "
                                f"(keys: {sorted(k for k in train_raw if k != 'images')})")
            if key not in test_raw:
                raise DataError(f"data.source.tasks.{name}: key {key!r} is in {where['train']} but not in "
                                f"{where['test']} (keys: {sorted(k for k in test_raw if k != 'images')})")
            if spec.bins and any(b >= c for b, c in zip(spec.bins, spec.bins[1:])):
                raise ConfigError(f"data.source.tasks.{name}.bins: expected strictly increasing edges, "
                                  f"got {spec.bins}")
            if spec.bins:
                classes = spec.classes or [f"{lo:g}-{hi:g}" for lo, hi in zip(spec.bins, spec.bins[1:])]
                conv = lambda v: _bin_labels(v.astype(np.float64), spec.bins)  # noqa: E731
            else:
                names = meta.get(key, {}).get("names")
                n = meta.get(key, {}).get("num_classes") or int(train_raw[key].max()) + 1
                classes = spec.classes or names or [str(i) for i in range(n)]
                conv = lambda v: v  # noqa: E731
            if spec.bins and spec.classes and len(spec.classes) != len(spec.bins) - 1:
                raise DataError(f"data.source.tasks.{name}: {len(spec.bins) - 1} bins but "
                                f"{len(spec.classes)} classes")
            tasks.append(Task(name, list(classes), flip_ok=spec.flip_ok))
            for raw, out, split in ((train_raw, train_labels, "train"), (test_raw, test_labels, "test")):
                out[name] = check_labels(conv(raw[key]), len(classes), name, where[split])
        return SourceData(tasks, ImageSet(train_raw["images"], train_labels),
                          ImageSet(test_raw["images"], test_labels))
