"""`cifar10` / `cifar100` through torchvision's dataset classes (official python pickle format).

`download: true` fetches and verifies the archive (needs internet). CIFAR-100 yields two tasks,
`fine` (100 classes) and `coarse` (20 superclasses); torchvision keeps only fine labels, so the
coarse ones are read from the same verified pickle files.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import numpy as np
from torchvision import datasets

from ...errors import DataError
from ...tasks import Task
from ..arrays import ImageSet, check_labels
from . import SOURCES, Source, SourceData


@dataclasses.dataclass
class CifarParams:
    root: str  # folder holding cifar-10-batches-py/ or cifar-100-python/
    download: bool = False


def _open(cls: type[datasets.CIFAR10], root: str, train: bool, download: bool, where: str) -> datasets.CIFAR10:
    try:
        return cls(root=os.path.expanduser(root), train=train, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise DataError(f"{where}.root={root!r}: {exc} (expected the official python version in "
                        f"{Path(root) / cls.base_folder}; set {where}.download: true to fetch it)") from None
    except OSError as exc:  # downloading: urllib's URLError, timeouts; else an unreadable file
        folder = Path(root) / cls.base_folder
        if not download:
            raise DataError(f"{where}.root={root!r}: cannot read {folder} ({exc})") from None
        raise DataError(f"{where}.root={root!r}: could not reach {cls.url} ({exc}); without internet, "
                        f"put the official python version in {folder} and set {where}.download: false") from None


def _pickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


class _CifarSource(Source):
    dataset: type

    def inputs(self) -> list[Path]:
        folder = Path(os.path.expanduser(self.params.root)) / self.dataset.base_folder
        return [folder] if folder.exists() else []


@SOURCES.register("cifar10", params=CifarParams)
class Cifar10Source(_CifarSource):
    """CIFAR-10 via torchvision (task `class`, 10 classes)."""

    dataset = datasets.CIFAR10

    def load(self) -> SourceData:
        sets = []
        for train in (True, False):
            ds = _open(self.dataset, self.params.root, train, self.params.download, self.where)
            labels = check_labels(np.array(ds.targets), 10, "class", f"{ds.root}/{ds.base_folder}")
            sets.append(ImageSet(ds.data, {"class": labels}))
        return SourceData([Task("class", list(ds.classes))], sets[0], sets[1])


@SOURCES.register("cifar100", params=CifarParams)
class Cifar100Source(_CifarSource):
    """CIFAR-100 via torchvision, tasks `fine` (100) and `coarse` (20)."""

    dataset = datasets.CIFAR100

    def load(self) -> SourceData:
        folder = None
        sets = []
        for train in (True, False):
            ds = _open(self.dataset, self.params.root, train, self.params.download, self.where)
            folder = Path(ds.root) / ds.base_folder
            files = ds.train_list if train else ds.test_list
            coarse = np.concatenate([_pickle(folder / name)["coarse_labels"] for name, _ in files])
            if len(coarse) != len(ds.targets):
                raise DataError(f"{folder}: {len(coarse)} coarse labels for {len(ds.targets)} images")
            where = f"{folder}/{files[0][0]}"
            sets.append(ImageSet(ds.data, {"fine": check_labels(np.array(ds.targets), 100, "fine", where),
                                           "coarse": check_labels(coarse, 20, "coarse", where)}))
        meta = _pickle(folder / ds.meta["filename"])
        tasks = [Task("fine", list(ds.classes)), Task("coarse", list(meta["coarse_label_names"]))]
        return SourceData(tasks, sets[0], sets[1])
