"""Decoding image files once, in parallel threads (Pillow releases the GIL while decoding)."""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image

from ..errors import DataError


def decode(data: bytes, size: Optional[int], channels: int, where: str) -> np.ndarray:
    """Bytes -> (H,W,C) uint8. With `size`, resize the short side to `size` and centre-crop a square."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and im.size != (size, size):
                w, h = im.size
                s = size / min(w, h)
                im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
                w, h = im.size
                left, top = (w - size) // 2, (h - size) // 2
                im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def _read(name: str, read: Callable[[], bytes]) -> bytes:
    try:
        return read()
    except OSError as exc:  # permissions, I/O errors, a file removed after listing
        raise DataError(f"{name}: cannot read file ({type(exc).__name__}: {exc})") from None


def decode_all(items: Iterable[tuple[str, Callable[[], bytes]]], size: Optional[int], channels: int,
               skip_corrupt: bool, skipped: list[str]) -> tuple[np.ndarray, list[int]]:
    """Decode (name, read_bytes) items; returns stacked images and the indices that were kept.

    Unreadable images raise a DataError naming the file, or are skipped and listed in `skipped`.
    All images must share one size unless `size` is given.
    """
    if channels not in (1, 3):
        raise DataError(f"data.source.channels must be 1 or 3, got {channels}")
    items = list(items)

    def one(i: int) -> Optional[np.ndarray]:
        name, read = items[i]
        try:
            return decode(_read(name, read), size, channels, name)
        except DataError:
            if skip_corrupt:
                return None
            raise

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        arrays = list(pool.map(one, range(len(items))))
    kept = [i for i, a in enumerate(arrays) if a is not None]
    skipped.extend(items[i][0] for i, a in enumerate(arrays) if a is None)
    if not kept:
        raise DataError(f"no readable images among {len(items)} file(s)"
                        + (f" (first: {items[0][0]})" if items else ""))
    shape = arrays[kept[0]].shape
    for i in kept:
        if arrays[i].shape != shape:
            raise DataError(f"{items[i][0]}: image is {arrays[i].shape[1]}x{arrays[i].shape[0]}, but "
                            f"{items[kept[0]][0]} is {shape[1]}x{shape[0]}; set data.image_size to resize")
    return np.stack([arrays[i] for i in kept]), kept
