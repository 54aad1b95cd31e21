"""In-memory image sets: uint8 NHWC arrays plus one int64 label vector per task (-1 = missing)."""
from __future__ import annotations

import dataclasses

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


def check_labels(labels: np.ndarray, num_classes: int, task: str, where: str) -> np.ndarray:
    """Return labels as int64, raising on values outside -1..num_classes-1 (names the first bad row)."""
    labels = np.asarray(labels).astype(np.int64)
    bad = np.flatnonzero((labels < -1) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{where}: task {task!r} label {int(labels[i])} at row {i} is out of range; expected 0..{num_classes - 1}"
            f" or -1 for missing ({len(bad)} bad value(s))"
        )
    return labels


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
