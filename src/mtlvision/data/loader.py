"""Batches straight from uint8 tensors: seeded per-epoch order, augmentation on whole batches.

No Dataset/DataLoader and no per-sample Python: a batch is one index_select on the uint8 cache,
then pad + random crop + flip as tensor ops, then normalisation. Every random draw is derived from
(seed, epoch, step), so a resumed run sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from .arrays import ImageSet


def _gen(*key: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


class TensorImages:
    """An ImageSet as tensors on the target device (images uint8 NHWC, labels int64)."""

    def __init__(self, data: ImageSet, device: torch.device) -> None:
        self.images = torch.from_numpy(np.array(data.images)).to(device)
        self.labels = {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in data.labels.items()}
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = idx.to(self.device, non_blocking=True)
        return self.images.index_select(0, idx), {k: v.index_select(0, idx) for k, v in self.labels.items()}


class BatchAugment:
    """Pad-and-random-crop plus optional horizontal flip, on a uint8 NHWC batch."""

    def __init__(self, crop_padding: int, flip: bool) -> None:
        self.pad = crop_padding
        self.flip = flip

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, h, w, _ = x.shape
        if self.pad > 0:
            p = self.pad
            padded = torch.nn.functional.pad(x, (0, 0, p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=g).to(x.device)
            rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
            cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
            x = padded[torch.arange(b, device=x.device)[:, None, None], rows, cols]
        if self.flip:
            mask = (torch.rand(b, generator=g) < 0.5).to(x.device)
            x = torch.where(mask[:, None, None, None], x.flip(2), x)
        return x


class Normalize:
    """uint8 NHWC -> float NCHW (channels_last strides when asked), standardised per channel."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool) -> None:
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=device) / torch.tensor(std, device=device)).view(1, -1, 1, 1)
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly channels_last NCHW
        if not self.channels_last:
            x = x.contiguous()
        return x.float().mul_(self.scale).sub_(self.shift)


class TrainLoader:
    """Shuffled fixed-size batches of one stream; `steps` per epoch (cycles if the stream is short)."""

    def __init__(self, data: TensorImages, batch_size: int, seed: int, stream: int,
                 augment: BatchAugment | None) -> None:
        if len(data) < batch_size:
            batch_size = len(data)
        self.data, self.batch_size, self.seed, self.stream, self.augment = data, batch_size, seed, stream, augment
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def natural_steps(self) -> int:
        return max(1, len(self.data) // self.batch_size)

    def _epoch_order(self, epoch: int, steps: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            n = len(self.data)
            laps = math.ceil(steps * self.batch_size / n)
            self._order = (epoch, torch.cat([torch.randperm(n, generator=_gen(self.seed, self.stream, epoch, k))
                                             for k in range(laps)]))
        return self._order[1]

    def batch(self, epoch: int, step: int, steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        order = self._epoch_order(epoch, steps)
        idx = order[step * self.batch_size:(step + 1) * self.batch_size]
        x, y = self.data.take(idx)
        if self.augment is not None:
            x = self.augment(x, _gen(self.seed, self.stream, epoch, step, 1))
        return x, y


def eval_batches(data: TensorImages, batch_size: int) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Sequential batches of a whole split (no augmentation)."""
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        yield data.take(idx)
