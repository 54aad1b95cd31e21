"""In-memory image sets: uint8 NHWC arrays plus one int64 label vector per task (-1 = missing)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError


@dataclasses.dataclass
class ImageSet:
    images: np.ndarray  # (N, H, W, C) uint8, possibly a read-only memmap
    labels: dict[str, np.ndarray]  # task -> (N,) int64, -1 = missing

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}")
        for name, lab in self.labels.items():
            if lab.shape != (len(self.images),):
                raise DataError(f"labels of task {name!r} have shape {lab.shape}, expected ({len(self.images)},)")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: np.ndarray) -> "ImageSet":
        idx = np.asarray(idx)
        return ImageSet(np.ascontiguousarray(self.images[idx]), {k: v[idx] for k, v in self.labels.items()})


def check_labels(labels: np.ndarray, num_classes: Optional[int], task: str, where: str,
                 locate: Callable[[int], str] = lambda i: f"row {i}") -> np.ndarray:
    """Return labels as int64, raising on a non-integer value (1.5, NaN, a string) and, unless `num_classes` is
    None, on a value outside -1..num_classes-1. Messages name the first bad row, as `locate(row)` says it."""
    a = np.asarray(labels)
    if a.dtype.kind not in "biuf":
        first = f" ({a.flat[0]!r} at {locate(0)})" if a.size else ""
        raise DataError(f"{where}: task {task!r} labels are {a.dtype}{first}; expected integer class indices")
    if a.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(a) | (a != np.round(a)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{where}: task {task!r} label {a[i].item()!r} at {locate(i)} is not an integer class "
                            f"index ({len(bad)} such value(s)); a numeric value is turned into classes with bins")
    high = np.inf if num_classes is None else num_classes
    bad = np.flatnonzero((a < -1) | (a >= high))
    if len(bad):
        i = int(bad[0])
        expected = "-1 for missing or a class index >= 0" if num_classes is None else (
            f"0..{num_classes - 1} or -1 for missing")
        raise DataError(f"{where}: task {task!r} label {int(a[i])} at {locate(i)} is out of range; expected {expected}"
                        f" ({len(bad)} bad value(s))")
    return a.astype(np.int64)


def adapt_images(images: np.ndarray, size: int | None, channels: int | None, chunk: int = 4096) -> np.ndarray:
    """Resize (antialiased bilinear) and convert channels once, before caching."""
    n, h, w, c = images.shape
    if channels not in (None, 1, 3):
        raise DataError(f"data.channels must be 1 or 3, got {channels}")
    out_c = channels or c
    out_hw = size or h
    if (size is None or (h == size and w == size)) and out_c == c:
        return images
    out = np.empty((n, out_hw, size or w, out_c), np.uint8)
    for s in range(0, n, chunk):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + chunk])).permute(0, 3, 1, 2).float()
        if out_c == 1 and c == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        elif out_c == 3 and c == 1:
            x = x.expand(-1, 3, -1, -1)
        if size is not None and (h, w) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + chunk] = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return out


def channel_stats(image_arrays: list[np.ndarray], max_images: int = 5000, chunk: int = 256,
                  ) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1 scale) of uint8 NHWC images: up to `max_images` of each array, strided
    (files are often sorted by class). Pixel sums are exact integers, accumulated `chunk` images at a time,
    so memory stays bounded at any image size and the result does not depend on the chunking."""
    total = square = count = 0
    for images in image_arrays:
        step = max(1, len(images) // max_images)
        picked = images[::step][:max_images]
        for s in range(0, len(picked), chunk):
            x = np.asarray(picked[s:s + chunk]).reshape(-1, images.shape[-1]).astype(np.int64)
            total, square, count = total + x.sum(0), square + (x * x).sum(0), count + len(x)
    mean = total / (255.0 * count)
    std = np.sqrt(np.maximum(square / (255.0**2 * count) - mean**2, 1e-6))
    return mean.tolist(), std.tolist()
