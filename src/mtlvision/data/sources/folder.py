"""`imagefolder` (class per folder, plain or in tar.gz) and `csv` (image folder + label columns)."""
from __future__ import annotations

import csv
import dataclasses
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ...errors import DataError
from ...tasks import MISSING, Task
from ..arrays import ImageSet
from ..decode import decode_all
from . import SOURCES, Source, SourceData, existing_path

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


@dataclasses.dataclass
class EncodedSample:
    """One image file, not decoded: what `mtlvision shards` packs byte for byte."""

    where: str  # for messages: the file (or archive:member), plus the CSV line for csv
    file: str  # the image's path (or archive:member)
    read: Callable[[], bytes]
    labels: dict[str, int]  # task -> class index, -1 = missing


@dataclasses.dataclass
class FolderParams:
    path: str  # holds train/ and test/ folders, or train.tar.gz and test.tar.gz
    train: str = "train"
    test: str = "test"
    task: str = "class"
    flip_ok: bool = True
    channels: int = 3
    skip_corrupt: bool = False


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


def _list_split(root: Path, split: str) -> list[tuple[str, str, Callable[[], bytes]]]:
    """(class, display name, reader) for every image of a split, from a folder or a tar.gz."""
    folder, tar = root / split, next((root / f"{split}{e}" for e in (".tar.gz", ".tgz", ".tar")
                                      if (root / f"{split}{e}").is_file()), None)
    if folder.is_dir():
        files = sorted(p for p in folder.glob("*/*") if p.is_file() and _is_image(p.name))
        return [(p.parent.name, str(p), p.read_bytes) for p in files]
    if tar is not None:
        out = []
        try:
            with tarfile.open(tar) as tf:
                for m in tf:
                    parts = Path(m.name).parts
                    if m.isfile() and _is_image(m.name) and len(parts) >= 2:
                        data = tf.extractfile(m).read()
                        out.append((Path(m.name), parts[-2], f"{tar}:{m.name}", (lambda d=data: d)))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # corrupt, truncated, unreadable
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{tar}: cannot read archive ({reason}); expected a valid .tar, .tar.gz or .tgz") from None
        # the same order as a folder listing (by path components), so folder and tar give equal arrays
        return [t[1:] for t in sorted(out, key=lambda t: t[0])]
    raise DataError(f"{root}: no {split}/ folder and no {split}.tar.gz")


@SOURCES.register("imagefolder", params=FolderParams)
class ImageFolderSource(Source):
    """ImageFolder layout (ImageNet-style): root/{train,test}/<class>/<image>, or those as tar.gz."""

    def inputs(self) -> list[Path]:
        return [existing_path(self.params.path, "data.source.path")]

    def samples(self) -> tuple[list[Task], dict[str, list[EncodedSample]]]:
        """The task and every split's files with their labels, not decoded."""
        p = self.params
        root = existing_path(p.path, "data.source.path")
        listings = {s: _list_split(root, getattr(p, s)) for s in ("train", "test")}
        classes = {s: sorted({c for c, _, _ in items}) for s, items in listings.items()}
        for s, items in listings.items():
            if not items:
                raise DataError(f"{root}: split {getattr(p, s)!r} has no images")
        if classes["train"] != classes["test"]:
            only_tr = sorted(set(classes["train"]) - set(classes["test"]))
            only_te = sorted(set(classes["test"]) - set(classes["train"]))
            raise DataError(f"{root}: class folders differ between train and test "
                            f"(only in train: {only_tr}; only in test: {only_te})")
        names = classes["train"]
        index = {c: i for i, c in enumerate(names)}
        return [Task(p.task, names, flip_ok=p.flip_ok)], {
            s: [EncodedSample(n, n, r, {p.task: index[c]}) for c, n, r in items] for s, items in listings.items()}

    def load(self) -> SourceData:
        p = self.params
        tasks, splits = self.samples()
        skipped: list[str] = []
        sets = {}
        for s, items in splits.items():
            imgs, kept = decode_all([(x.where, x.read) for x in items], self.image_size, p.channels,
                                    p.skip_corrupt, skipped)
            labels = np.array([items[i].labels[p.task] for i in kept], np.int64)
            sets[s] = ImageSet(imgs, {p.task: labels})
        return SourceData(tasks, sets["train"], sets["test"], skipped=skipped)


@dataclasses.dataclass
class CsvTask:
    column: Optional[str] = None  # default: the task's name
    classes: Optional[list[str]] = None  # default: sorted distinct values of the column
    flip_ok: bool = True


@dataclasses.dataclass
class CsvParams:
    images: str  # folder the image paths are relative to
    csv: str  # training rows (or all rows, with split_column)
    tasks: Union[dict[str, CsvTask], list[str]]
    test_csv: Optional[str] = None
    split_column: Optional[str] = None  # values train / val / test, when test_csv is not given
    image_column: str = "image"
    channels: int = 3
    skip_corrupt: bool = False


def _read_rows(path: Path, image_column: str, needed: list[str]) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: drops an Excel byte-order mark
            reader = csv.DictReader(f, restval="")  # short rows: missing trailing cells are empty
            header = reader.fieldnames or []
            missing = [c for c in [image_column, *needed] if c not in header]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; header is {header}")
            return [(i + 2, row) for i, row in enumerate(reader)]  # line numbers (header is line 1)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc}); expected a UTF-8 text file with a header row") from None


@SOURCES.register("csv", params=CsvParams)
class CsvSource(Source):
    """Your own images: a folder plus a CSV with one column per task (empty cell = missing label)."""

    def inputs(self) -> list[Path]:
        p = self.params
        paths = [existing_path(p.images, "data.source.images"), existing_path(p.csv, "data.source.csv")]
        return paths + ([existing_path(p.test_csv, "data.source.test_csv")] if p.test_csv else [])

    def _table(self) -> tuple[list[Task], dict[str, str], dict[str, list[tuple[Path, int, dict[str, str]]]]]:
        """Tasks, task -> column, and each split's (csv path, line, row), checked except for label values."""
        p = self.params
        specs = {n: CsvTask() for n in p.tasks} if isinstance(p.tasks, list) else p.tasks
        columns = {name: s.column or name for name, s in specs.items()}
        existing_path(p.images, "data.source.images")  # checked before any CSV is read
        csv_path = existing_path(p.csv, "data.source.csv")
        needed = list(columns.values()) + ([p.split_column] if p.split_column and not p.test_csv else [])
        rows = {"train": [(csv_path, n, r) for n, r in _read_rows(csv_path, p.image_column, needed)]}
        if p.test_csv:
            test_path = existing_path(p.test_csv, "data.source.test_csv")
            rows["test"] = [(test_path, n, r) for n, r in _read_rows(test_path, p.image_column, needed)]
        elif p.split_column:
            all_rows = rows["train"]
            for path, line, r in all_rows:
                if r[p.split_column].strip() not in ("train", "val", "test"):
                    raise DataError(f"{path} line {line}: {p.split_column} is {r[p.split_column]!r}; "
                                    "expected train, val or test")
            rows = {s: [t for t in all_rows if t[2][p.split_column].strip() == s] for s in ("train", "val", "test")}
            if not rows["val"]:
                del rows["val"]
        else:
            raise DataError("data.source: give test_csv or split_column so a test split exists")
        for s, rs in rows.items():
            if not rs:
                raise DataError(f"data.source: the {s} split has no rows")
        tasks = []
        for name, spec in specs.items():
            col = columns[name]
            # classes come from the training rows: a test value never trained on is an error
            seen = sorted({r[col].strip() for s, rs in rows.items() if s != "test" for _, _, r in rs} - {""})
            classes = spec.classes or seen
            tasks.append(Task(name, list(classes), flip_ok=spec.flip_ok))
        return tasks, columns, rows

    def samples(self) -> tuple[list[Task], dict[str, list[EncodedSample]]]:
        """The tasks and every split's files with their labels, not decoded."""
        tasks, columns, rows = self._table()
        img_root = existing_path(self.params.images, "data.source.images")
        indexes = [{c: i for i, c in enumerate(t.classes)} for t in tasks]
        splits = {}
        for s, rs in rows.items():
            splits[s] = []
            for path, line, r in rs:
                where, f, read = _file(img_root, self.params.image_column, path, line, r)
                labels = {t.name: _label(t, index, columns[t.name], path, line, r) for t, index in zip(tasks, indexes)}
                splits[s].append(EncodedSample(where, str(f), read, labels))
        return tasks, splits

    def load(self) -> SourceData:
        p = self.params
        tasks, columns, rows = self._table()
        img_root = existing_path(p.images, "data.source.images")
        skipped: list[str] = []
        sets = {}
        for s, rs in rows.items():
            items = [(where, read) for where, _, read in (_file(img_root, p.image_column, *row) for row in rs)]
            imgs, kept = decode_all(items, self.image_size, p.channels, p.skip_corrupt, skipped)
            labels = {}
            for t in tasks:
                index = {c: i for i, c in enumerate(t.classes)}
                labels[t.name] = np.array([_label(t, index, columns[t.name], *rs[i]) for i in kept], np.int64)
            sets[s] = ImageSet(imgs, labels)
        return SourceData(tasks, sets["train"], sets["test"], sets.get("val"), skipped=skipped)


def _file(img_root: Path, image_column: str, path: Path, line: int, row: dict[str, str],
          ) -> tuple[str, Path, Callable[[], bytes]]:
    """(where, image path, reader) of one row; the reader of a missing file raises naming the row."""
    f = img_root / row[image_column].strip()
    return f"{f} ({path.name} line {line})", f, f.read_bytes if f.is_file() else _missing(f, path, line)


def _label(t: Task, index: dict[str, int], column: str, path: Path, line: int, row: dict[str, str]) -> int:
    """The class index of one CSV cell (empty = missing), or an error naming the file and line."""
    v = row[column].strip()
    if v and v not in index:
        raise DataError(f"{path} line {line}: task {t.name!r} value {v!r} is not a known class; "
                        f"expected one of {t.classes} (the training rows' values unless the "
                        "task declares classes) or an empty cell for missing")
    return index[v] if v else MISSING


def _missing(f: Path, csv_path: Path, line: int) -> Callable[[], bytes]:
    def read() -> bytes:
        raise DataError(f"{csv_path} line {line}: image file {f} does not exist")
    return read
