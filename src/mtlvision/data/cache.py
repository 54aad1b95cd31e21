"""Decoded-image cache: a source is decoded (and resized) once into memory-mappable .npy files.

The key hashes the source's parameters, its input files' sizes and mtimes, and the image spec, so a
changed file or option builds a new entry. Entries are written to a temp folder and renamed, so a
killed build never leaves a half-written cache; an entry damaged later is deleted and built again.

A build holds an exclusive lock (flock) on `.locks/NAME-KEY.lock` in the cache: one process builds a key at
a time (others wait, then read its entry), and a temp folder of that key (`.NAME-KEY.XXXXXXXX.tmp`) found
while holding the lock belongs to no live build: it is what a killed build left, and is removed. Nothing
else is ever removed. Where the file system has no locks, builds run unlocked and remove nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

try:
    import fcntl
except ImportError:  # not POSIX: builds are not locked and stale temp folders stay
    fcntl = None  # type: ignore[assignment]

import numpy as np

from ..tasks import Task
from .arrays import ImageSet, adapt_images
from .sources import Source, SourceData

CACHE_VERSION = 2  # 2: EXIF orientation, 16-bit and float images scaled, source warnings stored
SPLITS = ("train", "val", "test")


def default_cache_root() -> Path:
    return Path(os.environ.get("MTLVISION_CACHE", Path.home() / ".cache" / "mtlvision"))


def cache_key(name: str, source: Source, image_size: Optional[int], channels: Optional[int]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "name": name, "source": source.fingerprint(),
                       "size": image_size, "channels": channels}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _adapt(data: SourceData, image_size: Optional[int], channels: Optional[int]) -> SourceData:
    for split in SPLITS:
        s = getattr(data, split)
        if s is not None:
            setattr(data, split, ImageSet(adapt_images(s.images, image_size, channels), s.labels))
    return data


def _write(entry: Path, data: SourceData) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=entry.parent))
    try:
        for split in SPLITS:
            s = getattr(data, split)
            if s is not None:
                np.save(tmp / f"{split}_images.npy", s.images)
                np.savez(tmp / f"{split}_labels.npz", **s.labels)
        meta = {"tasks": [t.to_dict() for t in data.tasks], "skipped": data.skipped, "warnings": data.warnings,
                "splits": [s for s in SPLITS if getattr(data, s) is not None]}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process finished the same entry first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read(entry: Path) -> SourceData:
    meta = json.loads((entry / "meta.json").read_text())
    sets = {}
    for split in meta["splits"]:
        with np.load(entry / f"{split}_labels.npz") as z:
            labels = {k: z[k] for k in z.files}
        sets[split] = ImageSet(np.load(entry / f"{split}_images.npy", mmap_mode="r"), labels)
    return SourceData([Task.from_dict(t) for t in meta["tasks"]], sets["train"], sets["test"],
                      sets.get("val"), meta["skipped"], meta["warnings"])


@contextlib.contextmanager
def _build_lock(entry: Path) -> Iterator[bool]:
    """Hold the exclusive build lock of `entry` (waiting for another build of it); yields whether it is held."""
    (entry.parent / ".locks").mkdir(parents=True, exist_ok=True)
    with open(entry.parent / ".locks" / f"{entry.name}.lock", "a") as f:
        held = fcntl is not None
        if held:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes, or the process dies
            except OSError:  # a file system without locks
                held = False
        yield held


def remove_stale_temps(entry: Path) -> list[Path]:
    """Remove the temp folders a killed build of `entry` left (call only while holding its build lock)."""
    ours = re.compile(rf"\.{re.escape(entry.name)}\.[a-z0-9_]{{8}}\.tmp")
    stale = [p for p in entry.parent.iterdir() if ours.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_source(name: str, source: Source, image_size: Optional[int], channels: Optional[int],
                cache_root: Optional[Path]) -> SourceData:
    """Load a source through the cache (built on first use); `cache_root=None` disables caching."""
    if cache_root is None or not source.cacheable:
        return _adapt(source.load(), image_size, channels)
    entry = Path(cache_root) / f"{name}-{cache_key(name, source, image_size, channels)}"
    with contextlib.suppress(Exception):  # no entry yet, or a broken one: build it (below)
        return _read(entry)
    with _build_lock(entry) as locked:
        try:
            return _read(entry)  # another process built it while this one waited
        except Exception:  # no entry yet, or a broken one (missing or corrupt file): build it afresh
            shutil.rmtree(entry, ignore_errors=True)
        if locked:
            remove_stale_temps(entry)
        _write(entry, _adapt(source.load(), image_size, channels))
    return _read(entry)
