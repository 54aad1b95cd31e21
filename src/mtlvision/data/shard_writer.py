"""Writing a shards folder (`mtlvision shards`; the format is described in `shards.py`): image files packed byte
for byte, in a seeded shuffled order, each shard written to a temp name and renamed, `index.json` last."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

from ..errors import DataError
from .decode import _read, probe
from .shard_index import FORMAT, INDEX, SPLITS, VERSION, ShardInfo

if TYPE_CHECKING:
    from .sources import Source
    from .sources.folder import EncodedSample

DEFAULT_SHARD_SIZE = 1000
_OURS = re.compile(r"^(?:(?:train|val|test)-\d{5}\.tar|\.(?:train|val|test)-\d{5}\.tar\.tmp|\.index\.json\.tmp)$")
_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "BMP": "bmp", "GIF": "gif", "WEBP": "webp", "TIFF": "tiff",
        "PPM": "ppm"}


def _encoded(x: "EncodedSample", skip: bool) -> Optional[tuple[bytes, str]]:
    """The file's bytes and the extension of their real format; None for an unreadable file when skipping."""
    try:
        data = _read(x.where, x.read)
        fmt = probe(data, x.where)
    except DataError:
        if skip:
            return None
        raise
    return data, _EXT.get(fmt, fmt.lower())


class _ShardWriter:
    """Appends samples to `SPLIT-NNNNN.tar` files, starting a new one at the sample or byte limit."""

    def __init__(self, out: Path, split: str, shard_size: Optional[int], max_bytes: Optional[int]) -> None:
        self.out, self.split, self.shard_size, self.max_bytes = out, split, shard_size, max_bytes
        self.done: list[ShardInfo] = []
        self.file: Optional[io.BufferedWriter] = None
        self.tar: Optional[tarfile.TarFile] = None
        self.count = 0

    @staticmethod
    def _final_size(offset: int, *members: bytes) -> int:
        """The tar's size once these members are added and it is closed (two zero blocks, 10 KiB records)."""
        end = offset + sum(512 + -(-len(m) // 512) * 512 for m in members) + 1024
        return -(-end // tarfile.RECORDSIZE) * tarfile.RECORDSIZE

    def add(self, key: str, ext: str, data: bytes, meta: bytes) -> None:
        full = self.tar is not None and (
            (self.shard_size is not None and self.count >= self.shard_size)
            or (self.max_bytes is not None and self._final_size(self.tar.offset, data, meta) > self.max_bytes))
        if full:
            self.close()
        if self.tar is None:
            self.file = open(self.out / f".{self.split}-{len(self.done):05d}.tar.tmp", "wb")
            self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
            self.count = 0
        for name, blob in ((f"{key}.{ext}", data), (f"{key}.json", meta)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o444, 0  # fixed metadata: same input, same bytes
            self.tar.addfile(info, io.BytesIO(blob))
        self.count += 1

    def close(self) -> None:
        """Finish the open shard and rename it to its final name."""
        if self.tar is None:
            return
        self.tar.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        name = f"{self.split}-{len(self.done):05d}.tar"
        tmp = self.out / f".{name}.tmp"
        size = tmp.stat().st_size
        os.replace(tmp, self.out / name)
        self.done.append(ShardInfo(name, self.count, size))
        self.tar = self.file = None


def _prepare(out: Path, overwrite: bool) -> None:
    """Create `out`, or empty a previous output (index first, so it is never complete in between)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise DataError(f"{out}: folder is not empty ({len(entries)} entries); choose a new folder, or pass "
                        "--overwrite to replace a previous `mtlvision shards` output")
    (out / INDEX).unlink(missing_ok=True)
    for p in entries:
        if _OURS.match(p.name):
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_shards(source: "Source", out: str | os.PathLike, *, splits: Optional[Iterable[str]] = None,
                 shard_size: Optional[int] = None, max_shard_mb: Optional[float] = None, seed: int = 0,
                 overwrite: bool = False, threads: Optional[int] = None) -> dict[str, Any]:
    """Pack the image files of `source` (imagefolder or csv) into shards under `out`; returns the index.

    `splits` defaults to every split the source has. A shard closes at `shard_size` samples or before it
    would pass `max_shard_mb` (default, when neither is given: 1000 samples). Files are read (and their
    format checked with Pillow) in `threads` threads; `index.json` is written last.
    """
    if not hasattr(source, "samples"):
        raise DataError(f"{source.where}: {type(source).__name__} has no image files to pack; "
                        "`mtlvision shards` reads imagefolder and csv sources")
    if shard_size is None and max_shard_mb is None:
        shard_size = DEFAULT_SHARD_SIZE
    if shard_size is not None and shard_size < 1:
        raise DataError(f"shard size: expected >= 1 sample, got {shard_size}")
    if max_shard_mb is not None and max_shard_mb <= 0:
        raise DataError(f"max shard size: expected > 0 MB, got {max_shard_mb}")
    tasks, samples = source.samples()
    chosen = list(samples) if splits is None else list(splits)
    for s in chosen:
        if s not in samples:
            raise DataError(f"split {s!r}: the source has splits {list(samples)}")
    out = Path(os.path.expanduser(out))
    _prepare(out, overwrite)
    skip = bool(getattr(source.params, "skip_corrupt", False))
    max_bytes = None if max_shard_mb is None else int(max_shard_mb * 2**20)
    index: dict[str, Any] = {"format": FORMAT, "version": VERSION, "tasks": [t.to_dict() for t in tasks],
                             "seed": seed, "splits": {}, "skipped": [], "warnings": list(source.warnings)}
    with ThreadPoolExecutor(max_workers=threads or min(8, os.cpu_count() or 1)) as pool:
        for split in chosen:
            items = samples[split]
            order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(len(items))
            writer = _ShardWriter(out, split, shard_size, max_bytes)
            n = 0
            for start in range(0, len(order), 256):  # bounded read-ahead, in the shuffled order
                chunk = [items[i] for i in order[start:start + 256]]
                for x, enc in zip(chunk, pool.map(lambda x: _encoded(x, skip), chunk)):
                    if enc is None:
                        index["skipped"].append(x.where)
                        continue
                    meta = json.dumps({"labels": x.labels, "source": x.file}).encode()
                    writer.add(f"{split}-{n:08d}", enc[1], enc[0], meta)
                    n += 1
            writer.close()
            if n == 0:
                raise DataError(f"split {split!r}: no readable images among {len(items)} file(s)")
            index["splits"][split] = {"samples": n, "shards": [dataclasses.asdict(s) for s in writer.done]}
    tmp = out / f".{INDEX}.tmp"  # written like the shards (umask permissions), renamed over the final name
    with open(tmp, "w") as f:
        f.write(json.dumps(index, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / INDEX)
    return index
