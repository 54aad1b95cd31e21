"""Reading image files and tar members with a size bound: nothing is read whole before its size is checked.

Used by the imagefolder and csv sources (files and `SPLIT.tar.gz`) and by the shard reader. A tar member is
read only if it is a regular file of at most `SizeLimit` bytes; directories are listed; links, devices,
fifos, sparse members and unknown member types are refused naming the archive and the member. The pax and
GNU long-name headers that `tarfile` reads into memory itself are bounded too (META_BYTES).
"""
from __future__ import annotations

import dataclasses
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import ConfigError, DataError

DEFAULT_MAX_IMAGE_MB = 64.0  # per image file or tar member; an 8000x8000 JPEG is ~10-30 MB
META_BYTES = 1 << 20  # pax / GNU long-name headers: a few hundred bytes in real archives
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


@dataclasses.dataclass(frozen=True)
class SizeLimit:
    """The most bytes one image file (or tar member) may have; `key` is the option that sets it, for messages."""

    mb: float = DEFAULT_MAX_IMAGE_MB
    key: str = "max_image_mb"

    def __post_init__(self) -> None:
        if not self.mb > 0:
            raise ConfigError(f"{self.key}: expected a size > 0 (MB), got {self.mb}")

    @property
    def bytes(self) -> int:
        return int(self.mb * 2**20)

    def check(self, where: str, size: int) -> None:
        if size > self.bytes:
            raise DataError(f"{where}: {size} bytes, more than the {self.mb:g} MB an image may have; raise "
                            f"{self.key} if your images are this large")


def read_file(path: Path, limit: SizeLimit) -> bytes:
    """The bytes of a regular file, refused (DataError) above `limit` before anything is read."""
    limit.check(str(path), os.stat(path).st_size)
    with open(path, "rb") as f:
        data = f.read(limit.bytes + 1)  # bounded even if the file grew after the stat
    limit.check(str(path), len(data))
    return data


def file_reader(path: Path, limit: SizeLimit) -> Callable[[], bytes]:
    return lambda: read_file(path, limit)


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an oversized pax or GNU long-name header before `tarfile` reads it whole."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:  # tarfile's own dispatch, kept otherwise
        if self.type in _META_TYPES and self.size > META_BYTES:
            raise DataError(f"{tf.name}: a header block at offset {self.offset} declares {self.size} bytes of "
                            f"extended header (limit {META_BYTES}); not a tar of image files")
        return super()._proc_member(tf)


def _kind(m: tarfile.TarInfo) -> str:
    for test, name in ((m.issparse, "sparse file"), (m.islnk, "hard link"), (m.issym, "symbolic link"),
                       (m.ischr, "character device"), (m.isblk, "block device"), (m.isfifo, "fifo")):
        if test():
            return name
    return f"member of tar type {m.type!r}"


def tar_members(path: Path, limit: SizeLimit, stream: bool = False,
                ) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """(member, read) for every directory and regular file of the tar at `path`, in stored order.

    For a file, `read()` returns its bytes, or raises a DataError without reading when the member is larger
    than `limit`; with `stream` (mode "r|", no seeking) it must be called before the next member is taken.
    Any other member type raises a DataError naming the archive and the member. `tarfile` errors propagate:
    callers say what the archive was expected to be.
    """
    with tarfile.open(path, mode="r|*" if stream else "r:*", tarinfo=_BoundedTarInfo) as tf:
        for m in tf:
            if m.issparse() or not (m.isreg() or m.isdir()):
                raise DataError(f"{path}: member {m.name!r} is a {_kind(m)}; expected regular image files only "
                                "(links, devices, fifos and sparse members are refused)")
            yield m, lambda m=m: _read_member(tf, m, f"{path}:{m.name}", limit)


def _read_member(tf: tarfile.TarFile, m: tarfile.TarInfo, where: str, limit: SizeLimit) -> bytes:
    limit.check(where, m.size)
    f = tf.extractfile(m)
    assert f is not None  # a regular, non-sparse member
    return f.read()
