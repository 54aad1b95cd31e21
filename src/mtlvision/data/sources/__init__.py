"""Data sources: each turns files (or a seed) into tasks plus uint8 train/test image sets.

A source is a class registered with `@SOURCES.register(name, params=ParamsDataclass)`; it receives
its validated parameters. `fingerprint()` identifies its inputs for the decoded cache.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from pathlib import Path
from typing import Any

from ...errors import DataError
from ...registry import SOURCES as SOURCES  # re-exported: `from mtlvision.data.sources import SOURCES`
from ...tasks import Task
from ..arrays import ImageSet
from ..files import SizeLimit



@dataclasses.dataclass
class SourceData:
    tasks: list[Task]
    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable files skipped
    warnings: list[str] = dataclasses.field(default_factory=list)  # what the source ignored or inferred, said once


class Source:
    """Base class: subclasses implement `load()` and list their input paths in `inputs()`.

    `where` is the config key the source came from (`data.source`, or `data.sources.NAME` in multi-input
    runs): messages that name a parameter name it as `{where}.KEY`. `warn()` records what a source ignored
    or inferred (empty class folders, class lists taken from the data...): `load()` returns them in
    `SourceData.warnings`, each once.
    """

    cacheable = True

    def __init__(self, params: Any, image_size: int | None = None, where: str = "data.source") -> None:
        self.params = params
        self.image_size = image_size  # sources that decode files resize to this while decoding
        self.where = where
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def inputs(self) -> list[Path]:
        return []

    def size_limit(self) -> SizeLimit:
        """The bound on one image file's bytes, from the source's `max_image_mb` parameter."""
        return SizeLimit(self.params.max_image_mb, f"{self.where}.max_image_mb")

    def fingerprint(self) -> dict[str, Any]:
        """Parameters plus size and mtime (ns) of every input file: any change invalidates the cache."""
        stats = []
        for p in self.inputs():
            paths = sorted(p.rglob("*")) if p.is_dir() else [p]
            for q in paths:
                if q.is_file():
                    st = q.stat()
                    stats.append([str(q.resolve()), st.st_size, st.st_mtime_ns])
        return {"class": type(self).__name__, "params": dataclasses.asdict(self.params), "files": stats}

    def load(self) -> SourceData:
        raise NotImplementedError


def listing(names: list[str], most: int = 5) -> str:
    """`a, b, c (+4 more)`: the first `most` names of a list, for one-line messages."""
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return ", ".join(names[:most]) + more


def existing_path(path: str, key: str) -> Path:
    """Resolve a user path, failing with the config key and the resolved location."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DataError(f"{key}: path {str(p)!r} does not exist (resolved to {p.resolve()})")
    return p


# every module in this package registers its sources: a new source is one file with one decorator
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
