"""`imagefolder`: a class per folder, plain or in a tar.gz; `EncodedSample`, an image file not decoded yet.

What a split holds besides class folders of images is ignored and reported once (`SourceData.warnings`):
files at the top of the split, class folders without image files, and non-image files or subfolders
inside class folders.
"""
from __future__ import annotations

import collections
import dataclasses
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from ...errors import DataError
from ...tasks import Task
from ..arrays import ImageSet
from ..decode import decode_all
from ..files import DEFAULT_MAX_IMAGE_MB, SizeLimit, file_reader, tar_members
from . import SOURCES, Source, SourceData, existing_path, listing

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}

Listing = list[tuple[str, str, Callable[[], bytes]]]  # (class, display name, reader) per image


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
    max_image_mb: float = DEFAULT_MAX_IMAGE_MB  # a larger image file or tar member is refused without reading it


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTS


@dataclasses.dataclass
class _Ignored:
    """What a split's listing passed over, by kind (for one warning per kind)."""

    top: list[str] = dataclasses.field(default_factory=list)  # files outside the class folders
    empty: list[str] = dataclasses.field(default_factory=list)  # class folders without image files
    inner: list[str] = dataclasses.field(default_factory=list)  # non-images and subfolders in class folders

    def messages(self, where: str) -> list[str]:
        kinds = ((self.top, "file(s) outside the class folders, ignored"),
                 (self.empty, "class folder(s) without image files, not used as classes"),
                 (self.inner, f"entr(ies) in class folders that are not image files ({', '.join(sorted(IMAGE_EXTS))})"
                              " or are subfolders, ignored"))
        return [f"{where}: {len(names)} {what}: {listing(names)}" for names, what in kinds if names]


def _list_folder(folder: Path, limit: SizeLimit) -> tuple[Listing, _Ignored]:
    out: Listing = []
    ignored = _Ignored()
    for entry in sorted(folder.iterdir()):  # by class, then by file name: the order of the split's arrays
        if not entry.is_dir():
            ignored.top.append(entry.name)
            continue
        n = len(out)
        for f in sorted(entry.iterdir()):
            if f.is_file() and is_image(f.name):
                out.append((entry.name, str(f), file_reader(f, limit)))
            else:
                ignored.inner.append(f"{entry.name}/{f.name}")
        if len(out) == n:
            ignored.empty.append(entry.name)
    return out, ignored


def _list_tar(tar: Path, limit: SizeLimit) -> tuple[Listing, _Ignored]:
    """Images at `[...]/<class>/<image>`. The class folders are at the depth where most images are (archives
    hold `train/<class>/...`, `<class>/...` or deeper prefixes); what lies above or below is reported. Every
    image is read here (a tar.gz cannot be read out of order); one over `limit` refuses the archive."""
    files, dirs = [], []  # (path parts, member name, reader: None unless an image)
    for m, read in tar_members(tar, limit):
        parts = Path(m.name).parts
        if m.isdir():
            dirs.append(parts)
        else:
            data = read() if is_image(m.name) and len(parts) >= 2 else None  # read now: a .gz reads in order
            files.append((parts, m.name, None if data is None else (lambda d=data: d)))
    depths = collections.Counter(len(parts) for parts, _, reader in files if reader is not None)
    depth = max(depths, key=lambda d: (depths[d], d)) if depths else 2
    out, used, ignored = [], set(), _Ignored()
    for parts, name, reader in files:
        if reader is not None and len(parts) == depth:
            out.append((parts, parts[-2], f"{tar}:{name}", reader))
            used.add(parts[:-1])
        else:
            (ignored.top if len(parts) < depth else ignored.inner).append(name)
    for parts in dirs:
        if len(parts) == depth - 1 and parts not in used:
            ignored.empty.append("/".join(parts))
        elif len(parts) >= depth:
            ignored.inner.append("/".join(parts) + "/")
    for names in (ignored.top, ignored.empty, ignored.inner):
        names.sort()
    # the same order as a folder listing (by path components), so folder and tar give equal arrays
    return [t[1:] for t in sorted(out, key=lambda t: t[0])], ignored


def _list_split(root: Path, split: str, limit: SizeLimit) -> tuple[Listing, _Ignored, str]:
    """(class, display name, reader) for every image of a split, from a folder or a tar.gz; what was ignored;
    and where the split was read from."""
    folder, tar = root / split, next((root / f"{split}{e}" for e in (".tar.gz", ".tgz", ".tar")
                                      if (root / f"{split}{e}").is_file()), None)
    if folder.is_dir():
        return *_list_folder(folder, limit), str(folder)
    if tar is not None:
        try:
            return *_list_tar(tar, limit), str(tar)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # corrupt, truncated, unreadable
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise DataError(f"{tar}: cannot read archive ({reason}); expected a valid .tar, .tar.gz or .tgz") from None
    raise DataError(f"{root}: no {split}/ folder and no {split}.tar.gz")


@SOURCES.register("imagefolder", params=FolderParams)
class ImageFolderSource(Source):
    """ImageFolder layout (ImageNet-style): root/{train,test}/<class>/<image>, or those as tar.gz."""

    def inputs(self) -> list[Path]:
        return [existing_path(self.params.path, f"{self.where}.path")]

    def samples(self) -> tuple[list[Task], dict[str, list[EncodedSample]]]:
        """The task and every split's files with their labels, not decoded."""
        p = self.params
        root = existing_path(p.path, f"{self.where}.path")
        limit = self.size_limit()
        listings = {}
        for s in ("train", "test"):
            listings[s], ignored, at = _list_split(root, getattr(p, s), limit)
            for message in ignored.messages(f"{self.where}: {at}"):
                self.warn(message)
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
                                    p.skip_corrupt, skipped, self.where)
            labels = np.array([items[i].labels[p.task] for i in kept], np.int64)
            sets[s] = ImageSet(imgs, {p.task: labels})
        return SourceData(tasks, sets["train"], sets["test"], skipped=skipped, warnings=list(self.warnings))
