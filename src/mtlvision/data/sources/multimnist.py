"""`multimnist`: two overlapping MNIST digits per image, tasks `left` and `right`.

Built deterministically as in Sener & Koltun (2018): a digit in the top-left and another in the
bottom-right of a 36x36 canvas (pixel-wise max where they overlap), resized to 28x28.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...tasks import Task
from ..arrays import ImageSet, adapt_images
from . import SOURCES, Source, SourceData, existing_path
from .npz import read_split


@dataclasses.dataclass
class MultiMnistParams:
    path: str  # an MNIST npz folder (train-*.npz / test-*.npz with `images`, `label`)
    seed: int = 0
    canvas: int = 36
    size: int = 28


def compose(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator, canvas: int,
            size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    n, h, w, _ = images.shape
    partner = rng.permutation(n)
    out = np.zeros((n, canvas, canvas, 1), np.uint8)
    out[:, :h, :w] = images
    off = canvas - h
    np.maximum(out[:, off:off + h, off:off + w], images[partner], out=out[:, off:off + h, off:off + w])
    return adapt_images(out, size, None), {"left": labels.astype(np.int64),
                                           "right": labels[partner].astype(np.int64)}


@SOURCES.register("multimnist", params=MultiMnistParams)
class MultiMnistSource(Source):
    """Multi-MNIST (Sener & Koltun 2018): left and right digit, built from MNIST npz shards."""

    def inputs(self) -> list[Path]:
        return [existing_path(self.params.path, f"{self.where}.path")]

    def load(self) -> SourceData:
        p = self.params
        root = existing_path(p.path, f"{self.where}.path")
        rng = np.random.default_rng(p.seed)
        digits = [str(i) for i in range(10)]
        sets = []
        for split in ("train", "test"):
            raw = read_split(root, split)
            if "label" not in raw:
                raise DataError(f"{root}/{split}-*.npz: no 'label' array (keys: {sorted(raw)}); "
                                "expected MNIST shards holding images and label")
            sets.append(ImageSet(*compose(raw["images"], raw["label"], rng, p.canvas, p.size)))
        tasks = [Task("left", digits, flip_ok=False), Task("right", digits, flip_ok=False)]
        return SourceData(tasks, sets[0], sets[1])
