"""`csv`: your own images, a folder plus a CSV with one label column per task (empty cell = missing label).

A task's classes are declared (`tasks: {NAME: {classes: [...]}}`: any other value is refused, naming the
CSV, line, column and value) or inferred from the training rows' values, which is reported once
(`SourceData.warnings`) with the class count, so a stray value is seen. Image paths are relative to the
images folder: an absolute path or one with `..` is refused (naming the CSV line) unless
`allow_outside_root: true`.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from ...errors import DataError
from ...tasks import MISSING, Task
from ..arrays import ImageSet
from ..decode import decode_all
from ..files import DEFAULT_MAX_IMAGE_MB, file_reader
from . import SOURCES, Source, SourceData, existing_path, listing
from .folder import EncodedSample

Row = tuple[Path, int, dict[str, str]]  # csv file, line number, cells


@dataclasses.dataclass
class CsvTask:
    column: Optional[str] = None  # default: the task's name
    classes: Optional[list[str]] = None  # default: sorted distinct values of the column's training rows
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
    allow_outside_root: bool = False  # accept absolute image paths and paths with `..`
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB  # a larger image file is refused without reading it


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
        p, w = self.params, self.where
        paths = [existing_path(p.images, f"{w}.images"), existing_path(p.csv, f"{w}.csv")]
        return paths + ([existing_path(p.test_csv, f"{w}.test_csv")] if p.test_csv else [])

    def _table(self) -> tuple[list[Task], dict[str, str], dict[str, list[Row]]]:
        """Tasks, task -> column, and each split's (csv path, line, row), checked except for label values."""
        p, w = self.params, self.where
        specs = {n: CsvTask() for n in p.tasks} if isinstance(p.tasks, list) else p.tasks
        columns = {name: s.column or name for name, s in specs.items()}
        existing_path(p.images, f"{w}.images")  # checked before any CSV is read
        csv_path = existing_path(p.csv, f"{w}.csv")
        needed = list(columns.values()) + ([p.split_column] if p.split_column and not p.test_csv else [])
        rows = {"train": [(csv_path, n, r) for n, r in _read_rows(csv_path, p.image_column, needed)]}
        if p.test_csv:
            test_path = existing_path(p.test_csv, f"{w}.test_csv")
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
            raise DataError(f"{w}: give test_csv or split_column so a test split exists")
        for s, rs in rows.items():
            if not rs:
                raise DataError(f"{w}: the {s} split has no rows")
        tasks = []
        for name, spec in specs.items():
            col = columns[name]
            # classes come from the training rows: a test value never trained on is an error
            counts = collections.Counter(r[col].strip() for s, rs in rows.items() if s != "test" for _, _, r in rs)
            counts.pop("", None)
            classes = spec.classes or sorted(counts)
            if not spec.classes and counts:
                rare, names = min(classes, key=lambda c: counts[c]), listing([repr(c) for c in classes], 10)
                self.warn(f"{w}.tasks.{name}: {len(classes)} classes inferred from column {col!r} of the training "
                          f"rows: {names} (fewest rows: {rare!r}, {counts[rare]}); declare {w}.tasks.{name}.classes "
                          "to refuse any other value")
            tasks.append(Task(name, list(classes), flip_ok=spec.flip_ok))
        return tasks, columns, rows

    def _file(self, img_root: Path, row: Row) -> tuple[str, Path, Callable[[], bytes]]:
        """(where, image path, reader) of one row; the reader of a missing file raises naming the row."""
        p = self.params
        path, line, cells = row
        cell = cells[p.image_column].strip()
        if not p.allow_outside_root and (Path(cell).is_absolute() or ".." in Path(cell).parts):
            raise DataError(f"{path} line {line}: image path {cell!r} points outside the images folder {img_root}; "
                            f"expected a path relative to it, without '..' (or set {self.where}.allow_outside_root: "
                            "true)")
        f = img_root / cell
        where = f"{f} ({path.name} line {line})"
        return where, f, file_reader(f, self.size_limit()) if f.is_file() else _missing(f, path, line)

    def samples(self) -> tuple[list[Task], dict[str, list[EncodedSample]]]:
        """The tasks and every split's files with their labels, not decoded."""
        tasks, columns, rows = self._table()
        img_root = existing_path(self.params.images, f"{self.where}.images")
        indexes = [{c: i for i, c in enumerate(t.classes)} for t in tasks]
        splits = {}
        for s, rs in rows.items():
            splits[s] = []
            for row in rs:
                where, f, read = self._file(img_root, row)
                labels = {t.name: _label(t, index, columns[t.name], *row) for t, index in zip(tasks, indexes)}
                splits[s].append(EncodedSample(where, str(f), read, labels))
        return tasks, splits

    def load(self) -> SourceData:
        p = self.params
        tasks, columns, rows = self._table()
        img_root = existing_path(p.images, f"{self.where}.images")
        skipped: list[str] = []
        sets = {}
        for s, rs in rows.items():
            items = [(where, read) for where, _, read in (self._file(img_root, row) for row in rs)]
            imgs, kept = decode_all(items, self.image_size, p.channels, p.skip_corrupt, skipped, self.where)
            labels = {}
            for t in tasks:
                index = {c: i for i, c in enumerate(t.classes)}
                labels[t.name] = np.array([_label(t, index, columns[t.name], *rs[i]) for i in kept], np.int64)
            sets[s] = ImageSet(imgs, labels)
        return SourceData(tasks, sets["train"], sets["test"], sets.get("val"), skipped=skipped,
                          warnings=list(self.warnings))


def _label(t: Task, index: dict[str, int], column: str, path: Path, line: int, row: dict[str, str]) -> int:
    """The class index of one CSV cell (empty = missing), or an error naming the file, line and column."""
    v = row[column].strip()
    if v and v not in index:
        known = listing([repr(c) for c in t.classes], 20)
        raise DataError(f"{path} line {line}: task {t.name!r} value {v!r} is not a known class (column {column!r}); "
                        f"expected one of {known} (the training rows' values unless the task declares classes) or an "
                        "empty cell for missing")
    return index[v] if v else MISSING


def _missing(f: Path, csv_path: Path, line: int) -> Callable[[], bytes]:
    def read() -> bytes:
        raise DataError(f"{csv_path} line {line}: image file {f} does not exist")
    return read
