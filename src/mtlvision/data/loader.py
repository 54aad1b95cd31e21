"""Batches straight from uint8 tensors: seeded per-epoch order, augmentation on whole batches.

No Dataset/DataLoader and no per-sample Python: a batch is one index_select on the uint8 cache,
then one gather that pads, crops and flips, then normalisation. Every random draw comes from
generators seeded with (seed, stream, epoch), so a resumed run sees exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

from ..rng import keyed_generator
from .arrays import ImageSet


class TensorImages:
    """An ImageSet as tensors on the target device (images uint8 NHWC, labels int64)."""

    def __init__(self, data: ImageSet, device: torch.device) -> None:
        self.images = torch.from_numpy(np.array(data.images)).to(device)
        self.labels = {k: torch.from_numpy(np.asarray(v, np.int64)).to(device) for k, v in data.labels.items()}
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.images.index_select(0, idx), {k: v.index_select(0, idx) for k, v in self.labels.items()}


class BatchAugment:
    """Pad-and-random-crop plus optional horizontal flip, on a uint8 NHWC batch.

    Random parameters are drawn for a whole epoch at once (`draw`) and moved to the device in one
    copy: a per-step host-to-device copy would stall the GPU queue every step.
    """

    def __init__(self, crop_padding: int, flip: bool) -> None:
        self.pad = crop_padding
        self.flip = flip

    def draw(self, n: int, g: torch.Generator) -> torch.Tensor:
        """(n, 3) int64: crop offset y, crop offset x, flip flag per sample."""
        offsets = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)
        flips = (torch.rand(n, generator=g) < 0.5).long()[:, None] if self.flip else offsets.new_zeros(n, 1)
        return torch.cat([offsets, flips], 1)

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """One gather does crop and flip: output pixel (i, j) reads padded (dy + i, dx + j or its mirror)."""
        b, h, w, _ = x.shape
        p = self.pad
        if p > 0:
            x = torch.nn.functional.pad(x, (0, 0, p, p, p, p))
        ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        cols = torch.where(params[:, 2, None].bool(), w - 1 - ar_w, ar_w) if self.flip else ar_w.expand(b, w)
        rows = (params[:, 0, None] + ar_h)[:, :, None]
        cols = (params[:, 1, None] + cols)[:, None, :]
        return x[torch.arange(b, device=x.device)[:, None, None], rows, cols]


class Normalize(torch.nn.Module):
    """uint8 NHWC -> float NCHW (channels_last strides when asked), standardised per channel:
    (x / 255 - mean) / std, computed as x * scale - shift. The one normalisation of training, evaluation,
    predict and the exported ONNX graph."""

    def __init__(self, mean: list[float], std: list[float], device: torch.device, channels_last: bool) -> None:
        super().__init__()
        std_t, mean_t = torch.tensor(std, device=device), torch.tensor(mean, device=device)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, -1, 1, 1))
        self.register_buffer("shift", (mean_t / std_t).view(1, -1, 1, 1))
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # a view: NHWC memory is exactly channels_last NCHW
        if not self.channels_last:
            x = x.contiguous()
        return x.float().mul_(self.scale).sub_(self.shift)


class TrainLoader:
    """Shuffled fixed-size batches of one stream; `steps` per epoch (cycles if the stream is short).

    The epoch's sample order and augmentation parameters come from generators seeded with
    (seed, stream, epoch): the same on every run and device, and cheap to regenerate on resume.
    Data parallel: a global batch is `world_size` x `batch_size` consecutive rows of that order, and
    rank r takes its r-th slice, so the ranks' batches are disjoint and together are exactly the
    batch one process would take with `world_size` x `batch_size`.
    """

    def __init__(self, data: TensorImages, batch_size: int, seed: int, stream: int,
                 augment: BatchAugment | None, rank: int = 0, world_size: int = 1) -> None:
        if len(data) < batch_size * world_size:
            batch_size = max(1, len(data) // world_size)
        self.data, self.batch_size, self.seed, self.stream, self.augment = data, batch_size, seed, stream, augment
        self.rank, self.world_size = rank, world_size
        self._plan: tuple[int, int, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def natural_steps(self) -> int:
        """Global batches in one pass over the stream."""
        return max(1, len(self.data) // (self.batch_size * self.world_size))

    def _epoch_plan(self, epoch: int, steps: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._plan is None or self._plan[:2] != (epoch, steps):
            n, total = len(self.data), steps * self.batch_size * self.world_size
            laps = math.ceil(total / n)
            order = torch.cat([torch.randperm(n, generator=keyed_generator(self.seed, self.stream, epoch, k))
                               for k in range(laps)])[:total]
            params = None
            if self.augment is not None:
                g = keyed_generator(self.seed, self.stream, epoch, -1)
                params = self.augment.draw(total, g).to(self.data.device)
            self._plan = (epoch, steps, order.to(self.data.device), params)
        return self._plan[2], self._plan[3]

    def extra_batch(self, epoch: int, step: int, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's part of the `index`-th extra global batch of a step (for balancing methods that draw
        more than one mini-batch): rows and augmentation keyed by (seed, stream, epoch, step, index)."""
        g = keyed_generator(self.seed, self.stream, epoch, step, index, -3)
        return keyed_batch(self.data, self.batch_size, g, self.rank, self.world_size, self.augment)

    def batch(self, epoch: int, step: int, steps: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        order, params = self._epoch_plan(epoch, steps)
        start = (step * self.world_size + self.rank) * self.batch_size
        rows = slice(start, start + self.batch_size)
        x, y = self.data.take(order[rows])
        if self.augment is not None:
            x = self.augment(x, params[rows])
        return x, y


def keyed_batch(data: TensorImages, batch_size: int, g: torch.Generator, rank: int = 0, world_size: int = 1,
                augment: BatchAugment | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rank `rank`'s slice of a global batch of `world_size` x `batch_size` random rows of `data` (without
    replacement where it has enough), drawn from `g`; augmented when `augment` is given."""
    total = batch_size * world_size
    laps = math.ceil(total / len(data))
    order = torch.cat([torch.randperm(len(data), generator=g) for _ in range(laps)])[:total]
    params = augment.draw(total, g) if augment is not None else None
    mine = slice(rank * batch_size, (rank + 1) * batch_size)
    x, y = data.take(order[mine].to(data.device))
    if augment is not None:
        x = augment(x, params[mine].to(data.device))
    return x, y


def eval_batches(data: TensorImages, batch_size: int, lo: int = 0, hi: int | None = None,
                 ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Sequential batches of rows [lo, hi) of a split (default: all of it; no augmentation)."""
    hi = len(data) if hi is None else hi
    for start in range(lo, hi, batch_size):
        end = min(start + batch_size, hi)
        yield data.images[start:end], {k: v[start:end] for k, v in data.labels.items()}
