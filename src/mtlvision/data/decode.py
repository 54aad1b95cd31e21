"""Decoding image files once, in parallel threads (Pillow releases the GIL while decoding).

Every path that turns image bytes into pixels goes through `decode`: the cache build (imagefolder, csv and
shards sources), the shard/stream reader, `predict`, and so the report's image grid (it shows decoded test
images). The shard writer checks files with `probe`, which opens them the same way. `decode`:

1. refuses an empty file ("empty file") and names a file Pillow cannot identify;
2. decodes a JPEG of more than LARGE_PIXELS at a reduced DCT scale (`Image.draft`) when the target size is
   known, and lets Pillow `reduce` other large images before resampling; at most LARGE_SLOTS large images
   are decoded at once, so memory stays bounded however large the files' (legal) pixel counts are;
3. applies the EXIF orientation (`ImageOps.exif_transpose`);
4. maps high-bit-depth modes to 8 bits (`to_8bit`);
5. converts to RGB or L, resizes the short side to `size` (bilinear) and centre-crops a square.

Images of at most LARGE_PIXELS in 8-bit modes without an EXIF rotation decode exactly as they did before
steps 2-4 existed. Pillow's decompression-bomb guard (`Image.MAX_IMAGE_PIXELS`) is kept: `Image.open`
refuses a header declaring more than twice that many pixels.
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DataError

LARGE_PIXELS = 1 << 24  # 16.8 Mpx (4096 x 4096): above this, images are reduced early and decoded LARGE_SLOTS at a time
LARGE_SLOTS = 2
REDUCING_GAP = 3.0  # early reduction keeps >= 3x the target size, then resamples (Pillow: "indistinguishable")
_large = threading.BoundedSemaphore(LARGE_SLOTS)
_MODES_16 = {"I;16", "I;16L", "I;16B", "I;16N"}


def open_image(data: bytes, where: str) -> Image.Image:
    """The (lazily decoded) Pillow image of encoded bytes; an empty or unidentifiable file raises naming `where`."""
    if not data:
        raise DataError(f"{where}: empty file (0 bytes); expected an image")
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise DataError(f"{where}: cannot decode image (not a format Pillow can identify; {len(data)} bytes "
                        f"starting with {data[:8]!r})") from None
    except Exception as exc:  # DecompressionBombError (the pixel-count guard), truncated headers, ...
        raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None


def to_8bit(im: Image.Image, where: str) -> Image.Image:
    """8-bit L for the high-bit-depth single-channel modes; other images unchanged.

    - 16-bit (`I;16`, `I;16L`, `I;16B`, `I;16N`): the high byte (v >> 8), which is how Pillow itself reduces
      16-bit RGB/RGBA PNGs and 16-bit PPMs, so a 16-bit image decodes the same stored as gray or as RGB;
    - 32-bit integer `I`: Pillow's decoders give 16-bit PNG/PGM data in this mode as 0..65535; mapped as
      16-bit; a value outside 0..65535 has no known range and is refused;
    - 32-bit float `F`: 0.0..1.0 maps to 0..255 (round(v * 255)); NaN, infinities or values outside
      0.0..1.0 are refused (a float image in another range must be rescaled by the user).
    """
    if im.mode in _MODES_16:
        return Image.fromarray((np.asarray(im) >> 8).astype(np.uint8))
    if im.mode == "I":
        a = np.asarray(im)
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 65535:
            raise DataError(f"{where}: 32-bit integer image with values {lo}..{hi}; expected 0..65535 (16-bit data) "
                            "to map to 8 bits; convert it to 8 or 16 bits")
        return Image.fromarray((a >> 8).astype(np.uint8))
    if im.mode == "F":
        a = np.asarray(im)
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            found = "NaN or infinite values" if not np.isfinite(a).all() else f"values {a.min():g}..{a.max():g}"
            raise DataError(f"{where}: float image with {found}; expected 0.0..1.0 (mapped to 0..255); rescale it "
                            "or save it as 8 or 16 bits")
        return Image.fromarray(np.rint(a * 255).astype(np.uint8))
    return im


def decode(data: bytes, size: Optional[int], channels: int, where: str) -> np.ndarray:
    """Bytes -> (H,W,C) uint8. With `size`, resize the short side to `size` and centre-crop a square."""
    with open_image(data, where) as im:
        try:
            large = im.width * im.height > LARGE_PIXELS
            if large and size is not None:
                s = size * REDUCING_GAP / min(im.size)
                im.draft(None, (max(1, round(im.width * s)), max(1, round(im.height * s))))  # JPEG only
            with _large if im.width * im.height > LARGE_PIXELS else contextlib.nullcontext():
                arr = _pixels(im, size, channels, where, large)
        except DataError:
            raise
        except Exception as exc:  # Pillow raises many types for corrupt data
            raise DataError(f"{where}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def _pixels(im: Image.Image, size: Optional[int], channels: int, where: str, large: bool) -> np.ndarray:
    ImageOps.exif_transpose(im, in_place=True)
    im = to_8bit(im, where)
    mode = "RGB" if channels == 3 else "L"
    if im.mode != mode:
        im = im.convert(mode)
    if size is not None and im.size != (size, size):
        w, h = im.size
        s = size / min(w, h)
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR,
                       reducing_gap=REDUCING_GAP if large else None)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im, dtype=np.uint8)


def probe(data: bytes, where: str) -> str:
    """Check encoded image bytes the way `decode` opens them, without decoding pixels; returns Pillow's format.

    The shard writer's check: an empty or unidentifiable file, or a corrupt one (`Image.verify`), raises naming
    `where`. The bytes are stored as they are (EXIF included), so every reader applies the orientation in `decode`.
    """
    with open_image(data, where) as im:
        try:
            fmt = im.format or "bin"
            im.verify()
        except Exception as exc:  # Pillow raises many types for corrupt data
            raise DataError(f"{where}: not a readable image ({type(exc).__name__}: {exc})") from None
    return fmt


def _read(name: str, read: Callable[[], bytes]) -> bytes:
    try:
        return read()
    except OSError as exc:  # permissions, I/O errors, a file removed after listing
        raise DataError(f"{name}: cannot read file ({type(exc).__name__}: {exc})") from None


def decode_all(items: Iterable[tuple[str, Callable[[], bytes]]], size: Optional[int], channels: int,
               skip_corrupt: bool, skipped: list[str], key: str = "data.source") -> tuple[np.ndarray, list[int]]:
    """Decode (name, read_bytes) items; returns stacked images and the indices that were kept.

    Unreadable images raise a DataError naming the file, or are skipped and listed in `skipped`.
    All images must share one size unless `size` is given. `key` is the source's config key, for messages.
    """
    if channels not in (1, 3):
        raise DataError(f"{key}.channels must be 1 or 3, got {channels}")
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
