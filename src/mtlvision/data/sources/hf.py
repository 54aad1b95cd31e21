"""`hf`: a dataset read through Hugging Face `datasets` (optional extra: pip install 'mtlvision[hf]').

`path` is a Hub id (`load_dataset_builder(path, subset, revision=..., data_files=...)`), a local folder or
file of parquet / arrow / image files (the same call, offline; a single file is the split `train`), a
packaged builder name with `data_files` (`path: parquet, data_files: {train: a.parquet, test: b.parquet}`),
or a folder written by `save_to_disk` (`load_from_disk`). `train` / `val` / `test` name splits in
`datasets`' split syntax, slices included (`train[:90%]`). Label columns become tasks; class names are
the values as text: bool -> `false`/`true`; integers -> sorted distinct values, so CelebA's -1/1 is a
binary task with class `-1` (absent) and `1` (present); whole-number floats as integers; strings ->
sorted distinct values; `ClassLabel` -> its names. Null / NaN (and a ClassLabel's -1) are missing (-1).
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import numpy as np

from ...errors import ConfigError, DataError
from ...tasks import MISSING, Task
from ..arrays import ImageSet
from ..decode import decode_all
from . import SOURCES, Source, SourceData

LOCAL_BUILDERS = ("parquet", "arrow", "imagefolder")  # `path` naming a builder: the files are data_files
SUFFIX_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
KINDS = {"bool": "bool", "string": "str", "large_string": "str", **{f"{s}int{b}": "int" for s in ("", "u")
         for b in (8, 16, 32, 64)}, **{f"float{b}": "float" for b in (16, 32, 64)}}


@dataclasses.dataclass
class HfTask:
    column: Optional[str] = None  # default: the task's name
    classes: Optional[list[str]] = None  # declared classes (values as text); other values are errors
    flip_ok: bool = True


@dataclasses.dataclass
class HfParams:
    path: str  # Hub id, local folder / parquet or arrow file, builder name with data_files, or save_to_disk folder
    subset: Optional[str] = None  # the dataset's configuration: load_dataset's `name`
    revision: Optional[str] = None  # Hub branch, tag or commit
    data_files: Optional[Union[str, list[str], dict[str, Union[str, list[str]]]]] = None
    train: str = "train"
    val: Optional[str] = None  # e.g. valid / validation; default: data.val_fraction of train
    test: str = "test"
    tasks: Union[Literal["all"], list[str], dict[str, HfTask]] = "all"  # all: every column but image / exclude
    exclude: list[str] = dataclasses.field(default_factory=list)
    image_column: str = "image"
    flip_ok: bool = True  # for tasks given as `all` or a list
    max_classes: int = 1000  # more distinct values than this (undeclared): not a label, an error
    channels: int = 3
    skip_corrupt: bool = False


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("data.source: the hf source needs Hugging Face `datasets`: "
                        "pip install 'mtlvision[hf]'") from None
    return datasets


@SOURCES.register("hf", params=HfParams)
class HfSource(Source):
    """Hugging Face `datasets` (Hub id, local parquet/arrow/imagefolder, save_to_disk): label columns as tasks."""

    _builder_cache: Any = None

    def _mode(self) -> str:
        """disk (save_to_disk folder), local (files) or hub."""
        p = self.params
        path = Path(os.path.expanduser(p.path))
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            bad = [k for k in ("subset", "revision", "data_files") if getattr(p, k) is not None]
            if bad:
                raise ConfigError(f"data.source.{bad[0]}: not used with a save_to_disk folder ({path})")
            return "disk"
        if path.exists() or p.path in LOCAL_BUILDERS:
            if p.revision is not None:
                raise ConfigError(f"data.source.revision: only for Hub datasets, but {p.path!r} is local; "
                                  "set it to null")
            return "local"
        if HUB_ID.match(p.path) and not p.path.startswith("."):
            return "hub"
        raise DataError(f"data.source.path: {p.path!r} does not exist (resolved to {path.resolve()}) "
                        "and is not a Hugging Face Hub id (owner/name)")

    def inputs(self) -> list[Path]:
        """Local files (the folder or file, and data_files' matches): their sizes and mtimes key the cache."""
        p = self.params
        if self._mode() == "hub":
            return []
        path = Path(os.path.expanduser(p.path))
        base = path if path.is_dir() else Path.cwd()
        patterns = [] if p.data_files is None else [p.data_files] if isinstance(p.data_files, str) else (
            p.data_files if isinstance(p.data_files, list) else [
                f for v in p.data_files.values() for f in ([v] if isinstance(v, str) else v)])
        found = [path] if path.exists() else []
        for pattern in map(os.path.expanduser, patterns):
            matches = sorted(base.glob(pattern)) if not Path(pattern).is_absolute() else sorted(
                Path("/").glob(pattern.lstrip("/")))
            if not matches:
                raise DataError(f"data.source.data_files: {pattern!r} matches no file (relative to {base})")
            found += matches
        return found

    def fingerprint(self) -> dict[str, Any]:
        """Local: parameters + file sizes and mtimes; Hub: parameters + the commit `datasets` resolved."""
        if self._mode() != "hub":
            return super().fingerprint()
        # <config_id>/<version>/<commit hash>: also the cached copy's commit when offline
        resolved = Path(self._builder().cache_dir).parts[-3:]
        return {"class": type(self).__name__, "params": dataclasses.asdict(self.params), "hub": list(resolved)}

    def _builder(self) -> Any:
        if self._builder_cache is None:
            p, ds = self.params, _datasets()
            path, data_files = p.path, p.data_files
            local = Path(os.path.expanduser(path))
            if local.is_file():
                if local.suffix not in SUFFIX_BUILDERS or data_files is not None:
                    raise ConfigError(f"data.source.path: {local} is a file: expected a "
                                      f"{' or '.join(SUFFIX_BUILDERS)} file, and no data_files")
                path, data_files = SUFFIX_BUILDERS[local.suffix], {"train": str(local)}
            elif local.is_dir():
                path = str(local.resolve())
            try:
                self._builder_cache = ds.load_dataset_builder(path, p.subset, data_files=data_files,
                                                              revision=p.revision)
            except ConnectionError as exc:
                raise DataError(
                    f"data.source.path: no local {local.resolve()}, and cannot reach {p.path!r} on the Hugging "
                    f"Face Hub ({exc}); without network, download it where there is (huggingface-cli download "
                    f"{p.path} --repo-type dataset --local-dir DIR) and set data.source.path to DIR (same subset "
                    "and splits), or point it at local parquet / arrow files") from None
            except Exception as exc:  # not found, unknown config, gated, bad data_files: datasets' message
                raise DataError(f"data.source: cannot load {p.path!r} with datasets "
                                f"({type(exc).__name__}: {exc})") from None
        return self._builder_cache

    def _splits(self) -> dict[str, Any]:
        """The train / val / test `Dataset`s the parameters name."""
        p, ds = self.params, _datasets()
        if self._mode() == "disk":
            loaded = ds.load_from_disk(os.path.expanduser(p.path))
            dd = loaded if isinstance(loaded, ds.DatasetDict) else {"train": loaded}
        else:
            builder = self._builder()
            try:
                builder.download_and_prepare()
                dd = builder.as_dataset()
            except Exception as exc:  # files unreadable, schemas differing between files, ...
                raise DataError(f"data.source: cannot prepare {p.path!r} with datasets "
                                f"({type(exc).__name__}: {exc})") from None
        out = {}
        for key in ("train", "val", "test"):
            spec = getattr(p, key)
            if spec is None:
                continue
            try:
                parts = ds.ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in dd.items()})
            except (ValueError, AssertionError) as exc:
                raise ConfigError(f"data.source.{key}: split {spec!r} of {p.path}: {exc}") from None
            if sum(i.to - i.from_ for i in parts) <= 0:
                raise DataError(f"data.source.{key}: split {spec!r} of {p.path} has no rows")
            sets = [dd[i.splitname].select(range(i.from_, i.to)) for i in parts if i.to > i.from_]
            out[key] = sets[0] if len(sets) == 1 else ds.concatenate_datasets(sets)
        return out

    def _specs(self, columns: list[str]) -> dict[str, HfTask]:
        p = self.params
        unknown = [c for c in p.exclude if c not in columns]
        if unknown:
            raise ConfigError(f"data.source.exclude: no column(s) {unknown} in {p.path} (columns: {columns})")
        if p.tasks == "all":
            names = [c for c in columns if c != p.image_column and c not in p.exclude]
            if not names:
                raise DataError(f"data.source.tasks: {p.path} has no label columns (columns: {columns})")
            return {c: HfTask(flip_ok=p.flip_ok) for c in names}
        return {n: HfTask(flip_ok=p.flip_ok) for n in p.tasks} if isinstance(p.tasks, list) else p.tasks

    def load(self) -> SourceData:
        p = self.params
        splits = self._splits()
        columns = list(splits["train"].column_names)
        specs = self._specs(columns)
        for split, d in splits.items():
            for key, col in [("image_column", p.image_column)] + [
                    (f"tasks.{n}", s.column or n) for n, s in specs.items()]:
                if col not in d.column_names:
                    raise DataError(f"data.source.{key}: column {col!r} not in {p.path} split "
                                    f"{getattr(p, split)!r} (columns: {d.column_names})")
        tasks, labels = [], {s: {} for s in splits}
        for name, spec in specs.items():
            task, per_split = self._task(name, spec, splits)
            tasks.append(task)
            for s, lab in per_split.items():
                labels[s][name] = lab
        skipped: list[str] = []
        sets = {}
        for s, d in splits.items():
            imgs, kept = decode_all(self._images(d, getattr(p, s)), self.image_size, p.channels,
                                    p.skip_corrupt, skipped)
            sets[s] = ImageSet(imgs, {k: v[kept] for k, v in labels[s].items()})
        return SourceData(tasks, sets["train"], sets["test"], sets.get("val"), skipped=skipped)

    def _task(self, name: str, spec: HfTask, splits: dict[str, Any]) -> tuple[Task, dict[str, np.ndarray]]:
        """The task of one label column and each split's labels (-1 = missing), without per-row Python."""
        p, col = self.params, spec.column or name
        feature = splits["train"].features[col]
        ds = _datasets()
        is_class = isinstance(feature, ds.ClassLabel)
        kind = "class" if is_class else KINDS.get(feature.dtype) if isinstance(feature, ds.Value) else None
        if kind is None:
            hint = f"; leave it out with data.source.exclude: [{col}]" if p.tasks == "all" else ""
            raise DataError(f"data.source.tasks.{name}: column {col!r} of {p.path} is {feature}, not a label "
                            f"(expected bool, integer, string or ClassLabel values){hint}")
        text: Callable[[Any], str] = {
            "bool": lambda u: "true" if u else "false", "str": str, "int": lambda u: str(int(u)),
            "float": lambda u: str(int(u)),
            "class": lambda u: feature.names[u] if 0 <= u < len(feature.names) else str(int(u))}[kind]
        at = {s: f"data.source.tasks.{name}: column {col!r} ({p.path} split {getattr(p, s)!r}" for s in splits}
        values = {s: _values(d, col, kind, at[s]) for s, d in splits.items()}
        classes = spec.classes or (["false", "true"] if kind == "bool" else list(feature.names) if is_class else [
            text(u) for u in np.unique(np.concatenate([v[~m] for s, (v, m) in values.items() if s != "test"]))])
        if not spec.classes and len(classes) > p.max_classes:
            raise DataError(f"data.source.tasks.{name}: column {col!r} of {p.path} has {len(classes)} distinct "
                            f"values, more than data.source.max_classes ({p.max_classes}): not a label? "
                            "Exclude it, or raise max_classes")
        index = {c: i for i, c in enumerate(classes)}
        out = {}
        for s, (v, miss) in values.items():
            uniq, inv = np.unique(v[~miss], return_inverse=True)
            lut = np.array([index.get(text(u), -2) for u in uniq], np.int64)  # -2: not a class
            lab = np.full(len(v), MISSING, np.int64)
            lab[~miss] = lut[inv.reshape(-1)]
            bad = np.flatnonzero(lab == -2)
            if len(bad):
                i = int(bad[0])
                raise DataError(
                    f"{at[s]}, row {i}): value {text(v[i])!r} is not a class; expected one of {classes} ("
                    + ("declared" if spec.classes else "its train and val values") + f"; {len(bad)} bad row(s))")
            out[s] = lab
        return Task(name, classes, flip_ok=spec.flip_ok), out

    def _images(self, d: Any, split: str) -> list[tuple[str, Callable[[], bytes]]]:
        """(where, read bytes) per row: `Image` storage (bytes or path), or a binary / path column cast to it."""
        p, ds = self.params, _datasets()
        feature = d.features[p.image_column]
        if not isinstance(feature, ds.Image):
            if getattr(feature, "dtype", None) not in ("string", "large_string", "binary", "large_binary"):
                raise DataError(f"data.source.image_column: column {p.image_column!r} of {p.path} is {feature}; "
                                "expected an Image feature, bytes or file paths")
            d = d.cast_column(p.image_column, ds.Image(decode=False))
        import pyarrow.compute as pc

        cells = d.select_columns([p.image_column]).with_format("arrow")[p.image_column]
        blobs, paths = pc.struct_field(cells, "bytes"), pc.struct_field(cells, "path").to_pylist()
        local = Path(os.path.expanduser(p.path))
        base = local if local.is_dir() else Path.cwd()
        items = []
        for i, f in enumerate(paths):
            where = f"{p.path} split {split!r} row {i}" + (f" ({f})" if f else "")
            items.append((where, lambda i=i, f=f, where=where: _read(blobs[i].as_py(), f, base, where)))
        return items


def _values(d: Any, col: str, kind: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, missing) of a label column: nulls, NaN and a ClassLabel's -1 are missing."""
    arr = d.select_columns([col]).with_format("arrow")[col]
    miss = np.asarray(arr.is_null().to_numpy(), bool)
    values = np.asarray(arr.fill_null({"bool": False, "str": ""}.get(kind, 0)).to_numpy())
    if kind == "float":
        miss |= np.isnan(values)
        frac = np.flatnonzero(~miss & ((values != np.round(values)) | np.isinf(values)))
        if len(frac):
            raise DataError(f"{where}, row {int(frac[0])}): value {values[frac[0]]} is not a label; expected "
                            "whole numbers (classes) in a float column")
        values = np.where(miss, 0, values).astype(np.int64)
    elif kind == "class":
        miss |= values == -1
    return values, miss


def _read(blob: Optional[bytes], file: Optional[str], base: Path, where: str) -> bytes:
    if blob is not None:
        return blob
    if not file:
        raise DataError(f"{where}: no image (neither bytes nor a path)")
    path = Path(file) if Path(file).is_absolute() else base / file
    return path.read_bytes()  # OSError -> decode_all's error names `where`
