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
from ...registry import SOURCES
from ...tasks import Task
from ..arrays import ImageSet



@dataclasses.dataclass
class SourceData:
    tasks: list[Task]
    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable files skipped


class Source:
    """Base class: subclasses implement `load()` and list their input paths in `inputs()`."""

    cacheable = True

    def __init__(self, params: Any, image_size: int | None = None) -> None:
        self.params = params
        self.image_size = image_size  # sources that decode files resize to this while decoding

    def inputs(self) -> list[Path]:
        return []

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


def existing_path(path: str, key: str) -> Path:
    """Resolve a user path, failing with the config key and the resolved location."""
    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DataError(f"{key}: path {str(p)!r} does not exist (resolved to {p.resolve()})")
    return p


# every module in this package registers its sources: a new source is one file with one decorator
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
