"""`shapes`: procedural RGB images with four attribute tasks, generated from a seed (no files).

Each image holds one shape on a noisy background. Tasks: shape (circle/square/triangle/plus),
colour (5 hues, jittered), size (small/large) and position (quadrant). Position is not
flip-invariant, so horizontal flips are disabled for this source.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ...tasks import Task
from ..arrays import ImageSet
from . import SOURCES, Source, SourceData

SHAPES = ["circle", "square", "triangle", "plus"]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
           "yellow": (230, 220, 40), "magenta": (210, 50, 210)}
SIZES = ["small", "large"]
POSITIONS = ["top-left", "top-right", "bottom-left", "bottom-right"]


@dataclasses.dataclass
class ShapesParams:
    n_train: int = 10000
    n_test: int = 2000
    size: int = 32
    seed: int = 0


def render(n: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Vectorised rendering of `n` images; returns (images NHWC uint8, labels per task)."""
    labels = {
        "shape": rng.integers(0, len(SHAPES), n),
        "colour": rng.integers(0, len(COLOURS), n),
        "size": rng.integers(0, len(SIZES), n),
        "position": rng.integers(0, len(POSITIONS), n),
    }
    q = size / 4  # quadrant centre offset
    cx = np.where(labels["position"] % 2 == 0, q, 3 * q) + rng.uniform(-q / 4, q / 4, n)
    cy = np.where(labels["position"] < 2, q, 3 * q) + rng.uniform(-q / 4, q / 4, n)
    r = np.where(labels["size"] == 0, rng.uniform(0.16, 0.22, n), rng.uniform(0.36, 0.44, n)) * size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    rr = r[:, None, None]
    adx, ady = np.abs(dx), np.abs(dy)
    masks = np.stack([
        dx**2 + dy**2 <= rr**2,
        np.maximum(adx, ady) <= rr * 0.8,
        (dy <= rr * 0.8) & (adx <= (dy + rr) * 0.58),
        ((adx <= rr / 3) & (ady <= rr)) | ((ady <= rr / 3) & (adx <= rr)),
    ])
    mask = masks[labels["shape"], np.arange(n)]
    base = np.array(list(COLOURS.values()), np.float32)[labels["colour"]]
    colour = np.clip(base + rng.uniform(-25, 25, (n, 3)), 0, 255)
    background = rng.uniform(0, 90, (n, 1, 1, 1)) + rng.normal(0, 12, (n, size, size, 3))
    img = np.where(mask[..., None], colour[:, None, None, :], background)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), {k: v.astype(np.int64) for k, v in labels.items()}


@SOURCES.register("shapes", params=ShapesParams)
class ShapesSource(Source):
    """Procedural shapes with 4 tasks (shape, colour, size, position); offline demo data."""

    cacheable = False  # generating is as fast as reading a cache

    def load(self) -> SourceData:
        p = self.params
        rng = np.random.default_rng(p.seed)
        train = ImageSet(*render(p.n_train, p.size, rng))
        test = ImageSet(*render(p.n_test, p.size, rng))
        tasks = [
            Task("shape", SHAPES, flip_ok=True),
            Task("colour", list(COLOURS), flip_ok=True),
            Task("size", SIZES, flip_ok=True),
            Task("position", POSITIONS, flip_ok=False),
        ]
        return SourceData(tasks, train, test)
