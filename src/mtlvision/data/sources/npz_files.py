"""Reading the `npz` source's files: shards `PREFIX-*.npz` (one prefix or several, merged in order), the
rows they hold (for messages naming row and file), and the `label_kinds` of the folder's meta.json."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Union

import numpy as np

from ...errors import DataError

Prefixes = Union[str, list[str]]


def prefixes(split: Prefixes) -> list[str]:
    return [split] if isinstance(split, str) else list(split)


def pattern(root: Path, split: Prefixes) -> str:
    """`ROOT/train-*.npz`, or `ROOT/{background,evaluation}-*.npz` for several prefixes (for messages)."""
    names = prefixes(split)
    return f"{root}/{names[0] if len(names) == 1 else '{' + ','.join(names) + '}'}-*.npz"


@dataclasses.dataclass
class Rows:
    """Where each row of a (possibly filtered) split comes from, for messages: `rows(i)` is "row R of FILE"."""

    files: list[tuple[Path, int]]  # the split's shards and their row counts, in order
    index: np.ndarray  # each row's position in the concatenated shards

    def take(self, keep: np.ndarray) -> "Rows":
        return Rows(self.files, self.index[keep])

    def __call__(self, i: int) -> str:
        ends = np.cumsum([n for _, n in self.files])
        g = int(self.index[i])
        k = int(np.searchsorted(ends, g, side="right"))
        return f"row {g - (int(ends[k - 1]) if k else 0)} of {self.files[k][0]}"


@dataclasses.dataclass
class Split:
    """One split's arrays (`images` and the label keys), where its rows come from, and its file pattern."""

    raw: dict[str, np.ndarray]
    rows: Rows
    where: str

    def take(self, keep: np.ndarray) -> "Split":
        return Split({k: v[keep] for k, v in self.raw.items()}, self.rows.take(keep), self.where)

    def __len__(self) -> int:
        return len(self.raw["images"])


def read_shards(root: Path, split: Prefixes) -> Split:
    """Every shard `PREFIX-*.npz` of each prefix, in prefix then file order, concatenated."""
    files = []
    for prefix in prefixes(split):
        found = sorted(root.glob(f"{prefix}-*.npz"))
        if not found:
            raise DataError(f"{root}: no files {prefix}-*.npz (found: {sorted(p.name for p in root.glob('*.npz'))})")
        files += found
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
        if images.shape[1:] != parts[0]["images"].shape[1:]:
            raise DataError(f"{f}: images are {images.shape[1:]} but those of {files[0]} are "
                            f"{parts[0]['images'].shape[1:]}; expected one image shape per split")
    counts = [len(part["images"]) for part in parts]
    raw = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return Split(raw, Rows(list(zip(files, counts)), np.arange(sum(counts))), pattern(root, split))


def read_split(root: Path, split: Prefixes) -> dict[str, np.ndarray]:
    """Every array of a split's shards, concatenated in file order."""
    return read_shards(root, split).raw


def read_meta(root: Path) -> dict[str, dict]:
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
