"""What the data layer promises about hostile or unusual input (issue 17): high-bit-depth and EXIF-rotated
images decode correctly everywhere, archives and indexes cannot exhaust memory or escape their folder,
labels are never truncated or silently extended, and what a source ignores is reported. Files are made in
tmp_path; nothing large is ever written (declared sizes and small limits show the bounds)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import mtlvision.data.decode as decode_mod
from mtlvision import inference
from mtlvision.data import SOURCES
from mtlvision.data.cache import load_source
from mtlvision.data.decode import decode, decode_all
from mtlvision.data.shards import ShardReader, write_shards
from mtlvision.errors import ConfigError, DataError


def make_source(spec: dict, where: str = "data.source", image_size=None):
    return SOURCES.build(SOURCES.spec(spec, where), image_size=image_size, where=where)


def load(spec: dict, **kw):
    return make_source(spec, **kw).load()


def encode(a: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    im = a if isinstance(a, Image.Image) else Image.fromarray(a)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def old_decode(data: bytes, size, channels: int) -> np.ndarray:
    """The decoder before issue 17 (convert, bilinear short-side resize, centre crop): the reference that
    ordinary 8-bit images must still match byte for byte."""
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
    return arr.reshape(arr.shape[0], arr.shape[1], channels)


def png16(a: np.ndarray) -> bytes:
    """A 16-bit PNG (grey (H,W) or RGB (H,W,3)) written by hand: Pillow cannot write 16-bit RGB."""
    import struct
    import zlib
    h, w = a.shape[:2]
    color = 0 if a.ndim == 2 else 2
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------------------------------
# 3. high bit depth

def full_range_16bit(h: int = 16, w: int = 64) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * (65535 // (h * w - 1))).astype(np.uint16)


def test_16bit_grey_png_is_scaled_not_clipped():
    a = full_range_16bit()
    data = encode(a)  # Pillow writes a uint16 array as a 16-bit grey PNG, read back as mode I;16
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    expected = (a >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode(data, None, 1, "g.png")[..., 0], expected)
    rgb = decode(data, None, 3, "g.png")
    np.testing.assert_array_equal(rgb, np.repeat(expected[..., None], 3, -1))
    assert (rgb == 255).mean() < 0.01  # before: 99.6% of the pixels clipped to 255


def test_16bit_rgb_png_matches_the_grey_one():
    """Pillow 10+ opens a 16-bit RGB PNG as RGB already reduced to the high byte; the grey path uses the same
    mapping, so one 16-bit picture decodes the same whichever way it was stored."""
    a = full_range_16bit()
    rgb = decode(png16(np.repeat(a[..., None], 3, -1)), None, 3, "rgb16.png")
    np.testing.assert_array_equal(rgb, decode(png16(a), None, 3, "grey16.png"))
    np.testing.assert_array_equal(rgb[..., 1], (a >> 8).astype(np.uint8))


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16bit_tiff_byte_orders(mode):
    a = full_range_16bit(4, 8)
    im = Image.frombytes(mode, (8, 4), a.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    data = encode(im, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    np.testing.assert_array_equal(decode(data, None, 1, "t.tif")[..., 0], (a >> 8).astype(np.uint8))


def test_32bit_integer_image():
    a = full_range_16bit(4, 8)
    pgm = b"P5\n8 4\n65535\n" + a.astype(">u2").tobytes()  # 16-bit PGM: Pillow opens it as mode I
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    np.testing.assert_array_equal(decode(pgm, None, 1, "a.pgm")[..., 0], (a >> 8).astype(np.uint8))
    wild = encode(Image.fromarray(np.array([[0, 70000], [5, 6]], np.int32)), "TIFF")
    with pytest.raises(DataError, match=r"wild\.tif: 32-bit integer image with values 0\.\.70000; expected 0\.\.65535"):
        decode(wild, None, 1, "wild.tif")


def test_float_image_maps_0_to_1():
    a = np.linspace(0, 1, 32, dtype=np.float32).reshape(4, 8)
    data = encode(Image.fromarray(a), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(decode(data, None, 1, "f.tif")[..., 0], np.rint(a * 255).astype(np.uint8))
    for bad, found in ((a * 255, r"values 0\.\.255"), (np.where(a > 0.5, np.nan, a), "NaN")):
        with pytest.raises(DataError, match=rf"f\.tif: float image with {found}.*expected 0\.0\.\.1\.0"):
            decode(encode(Image.fromarray(bad.astype(np.float32)), "TIFF"), None, 1, "f.tif")


# ----------------------------------------------------------------------------------------------------
# 4. EXIF orientation, the same in every decode path

def rotated_jpeg(a: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(a, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_applied():
    a = np.zeros((8, 16, 3), np.uint8)
    a[:, :8, 0] = 250  # red on the left half: a 90 degree rotation moves it to the top
    plain = decode(encode(a, "JPEG", quality=95), None, 3, "plain.jpg")
    np.testing.assert_array_equal(decode(rotated_jpeg(a, 6), None, 3, "r.jpg"), np.rot90(plain, -1))  # 90 cw
    np.testing.assert_array_equal(decode(rotated_jpeg(a, 3), None, 3, "r.jpg"), plain[::-1, ::-1])
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90 degrees counter-clockwise to display
    png = encode(a, "PNG", exif=exif.tobytes())  # lossless: exact pixels
    np.testing.assert_array_equal(decode(png, None, 3, "r.png"), np.rot90(a, 1))


def test_every_decode_path_applies_exif(tmp_path):
    """imagefolder (cache build), the shard writer + ShardReader (stream) + shards source, and predict all
    decode an EXIF-rotated phone photo the same, upright."""
    rng = np.random.default_rng(0)
    expected = {}
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for j in range(2):
                a = rng.integers(0, 256, (8, 16, 3), np.uint8)
                data = rotated_jpeg(a, 6)
                (tmp_path / "imgs" / split / c / f"{j}.jpg").write_bytes(data)
                upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
                assert upright.shape == (16, 8, 3)
                expected[upright.tobytes()] = c
    folder = load_source("f", make_source({"name": "imagefolder", "path": str(tmp_path / "imgs")}), None, None,
                         tmp_path / "cache")
    got = [x.tobytes() for s in (folder.train, folder.test) for x in np.asarray(s.images)]
    assert sorted(got) == sorted(expected)
    write_shards(make_source({"name": "imagefolder", "path": str(tmp_path / "imgs")}), tmp_path / "out", shard_size=2)
    (images, _), = list(ShardReader(tmp_path / "out", "test", batch_size=8).worker_batches(0, 1))
    assert sorted(x.tobytes() for x in images.numpy()) == sorted(x.tobytes() for x in folder.test.images)
    shards = load({"name": "shards", "path": str(tmp_path / "out")})
    assert sorted(x.tobytes() for x in shards.train.images) == sorted(x.tobytes() for x in folder.train.images)
    assert inference.decode is decode  # predict decodes files with this same function


# ----------------------------------------------------------------------------------------------------
# ordinary images decode exactly as before; very large ones are reduced early (10)

def test_ordinary_images_decode_exactly_as_before():
    rng = np.random.default_rng(1)
    for w, h in ((32, 32), (500, 375), (333, 777)):
        a = (np.cumsum(rng.integers(0, 256, (h, w, 3)), 1) % 256).astype(np.uint8)
        for data in (encode(a, "JPEG"), encode(a), encode(Image.fromarray(a).convert("P")),
                     encode(Image.fromarray(a).convert("L"), "JPEG")):
            for size in (None, 32, 64):
                for channels in (1, 3):
                    np.testing.assert_array_equal(decode(data, size, channels, "x"), old_decode(data, size, channels))


def test_cifar10_jpegs_decode_as_before(shared_data):
    with tarfile.open(shared_data / "cifar10" / "test.tar.gz") as tf:
        files = [tf.extractfile(m).read() for _, m in zip(range(300), (m for m in tf if m.isfile()))]
    for data in files:
        for size, channels in ((None, 3), (32, 3), (None, 1), (64, 3)):
            np.testing.assert_array_equal(decode(data, size, channels, "c"), old_decode(data, size, channels))


def test_large_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    side = 4200  # 17.6 Mpx, above LARGE_PIXELS: a legal image that would take 17.6 MB (grey) at full size
    y, x = np.mgrid[0:side, 0:side]
    a = ((x + y) * 255 // (2 * side)).astype(np.uint8)
    data = encode(a, "JPEG", quality=90)
    decoded_sizes = []
    real = decode_mod.to_8bit
    monkeypatch.setattr(decode_mod, "to_8bit", lambda im, where: decoded_sizes.append(im.size) or real(im, where))
    out = decode(data, 64, 1, "big.jpg")
    assert decoded_sizes == [(525, 525)]  # the DCT decoded at 1/8 scale: 0.28 Mpx instead of 17.6
    reference = old_decode(data, 64, 1).astype(int)  # full decode, then resize
    assert out.shape == (64, 64, 1) and np.abs(out.astype(int) - reference).max() <= 2


def test_large_decodes_are_limited_in_number(monkeypatch):
    """However many threads decode, at most LARGE_SLOTS large images are in memory at once."""
    monkeypatch.setattr(decode_mod, "LARGE_PIXELS", 100)  # every 16x16 image counts as large
    busy, peak, lock = [0], [0], threading.Lock()
    real = decode_mod.to_8bit

    def slow(im, where):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.02)
        with lock:
            busy[0] -= 1
        return real(im, where)

    monkeypatch.setattr(decode_mod, "to_8bit", slow)
    monkeypatch.setattr(decode_mod.os, "cpu_count", lambda: 8)
    data = encode(np.zeros((16, 16, 3), np.uint8))
    images, kept = decode_all([(f"{i}.png", lambda: data) for i in range(16)], 8, 3, False, [])
    assert len(kept) == 16 and 1 <= peak[0] <= decode_mod.LARGE_SLOTS


# ----------------------------------------------------------------------------------------------------
# 16. empty files

def small_folder(root: Path, ext: str = "png") -> None:
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), 60 if c == "a" else 120, np.uint8)).save(root / split / c / f"0.{ext}")


def pack(root: Path, dst: Path) -> None:
    dst.mkdir(exist_ok=True)
    for split in ("train", "test"):
        with tarfile.open(dst / f"{split}.tar.gz", "w:gz") as tf:
            tf.add(root / split, arcname=split)


def test_zero_byte_image_says_empty_file(tmp_path):
    small_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "train" / "a" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"train/a/empty\.png: empty file \(0 bytes\)"):
        load({"name": "imagefolder", "path": str(tmp_path / "imgs")})
    pack(tmp_path / "imgs", tmp_path / "tars")
    with pytest.raises(DataError, match=r"train\.tar\.gz:train/a/empty\.png: empty file"):
        load({"name": "imagefolder", "path": str(tmp_path / "tars")})
    with pytest.raises(DataError, match=r"empty\.png: empty file"):
        write_shards(make_source({"name": "imagefolder", "path": str(tmp_path / "imgs")}), tmp_path / "out")


# ----------------------------------------------------------------------------------------------------
# 7. archives: bounded reads, no sparse or special members, shards confined to their folder

def test_member_over_the_size_limit_is_refused_unread(tmp_path):
    small_folder(tmp_path / "imgs")
    big = np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)  # ~12 KB as PNG
    Image.fromarray(big).resize((4, 4)).save(tmp_path / "imgs" / "train" / "a" / "1.png")
    Image.fromarray(big).save(tmp_path / "imgs" / "train" / "b" / "big.png")
    pack(tmp_path / "imgs", tmp_path / "tars")
    spec = {"name": "imagefolder", "path": str(tmp_path / "tars"), "max_image_mb": 0.005}
    with pytest.raises(DataError, match=r"train\.tar\.gz:train/b/big\.png: \d+ bytes, more than the 0\.005 MB an "
                                        r"image may have; raise data\.source\.max_image_mb"):
        load(spec)
    with pytest.raises(DataError, match=r"big\.png: \d+ bytes"):  # an archive member refuses the archive
        load(spec | {"skip_corrupt": True})
    with pytest.raises(DataError, match=r"big\.png: \d+ bytes, more than the 0\.005 MB"):  # plain files too
        load(spec | {"path": str(tmp_path / "imgs")})
    skipped = load(spec | {"path": str(tmp_path / "imgs"), "skip_corrupt": True}).skipped  # like an unreadable file
    assert [Path(s).name for s in skipped] == ["big.png"]
    with pytest.raises(ConfigError, match=r"data\.source\.max_image_mb: expected a size > 0"):
        load(spec | {"max_image_mb": 0})


def test_declared_huge_member_is_refused_before_reading(tmp_path):
    """A member header declaring 1 GB (a 1 MB tar.gz of zeros can hold one) is refused by its declared size."""
    small_folder(tmp_path / "imgs")
    pack(tmp_path / "imgs", tmp_path / "tars")
    info = tarfile.TarInfo("train/a/huge.png")
    info.size = 1 << 30
    with tarfile.open(tmp_path / "tars" / "train.tar.gz", "w:gz") as tf:
        tf.fileobj.write(info.tobuf(format=tarfile.USTAR_FORMAT) + b"\x89PNG" + b"\0" * 4096)
    with pytest.raises(DataError, match=r"train\.tar\.gz:train/a/huge\.png: 1073741824 bytes, more than the 64 MB"):
        load({"name": "imagefolder", "path": str(tmp_path / "tars")})


def sparse_member(name: str, expanded: int = 8 << 20) -> tuple[tarfile.TarInfo, io.BytesIO]:
    """A GNU sparse member (pax format 0.1): 10 stored bytes that a reader expands to `expanded` bytes."""
    info = tarfile.TarInfo(name)
    info.size = 10
    info.pax_headers = {"GNU.sparse.map": "0,10", "GNU.sparse.size": str(expanded)}
    return info, io.BytesIO(b"x" * 10)


def special_member(kind: str, name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                 "device": tarfile.CHRTYPE}[kind]
    info.linkname = "/dev/zero" if kind in ("symlink", "hardlink") else ""
    return info, None


@pytest.mark.parametrize("kind", ["sparse", "symlink", "hardlink", "fifo", "device"])
def test_sparse_and_special_members_are_refused(tmp_path, kind):
    small_folder(tmp_path / "imgs")
    pack(tmp_path / "imgs", tmp_path / "tars")
    name = "train/a/odd.png"
    member = sparse_member(name) if kind == "sparse" else special_member(kind, name)
    with tarfile.open(tmp_path / "tars" / "train.tar.gz", "w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.add(tmp_path / "imgs" / "train", arcname="train")
        tf.addfile(*member)
    word = {"sparse": "sparse file", "symlink": "symbolic link", "hardlink": "hard link", "fifo": "fifo",
            "device": "character device"}[kind]
    with pytest.raises(DataError, match=rf"train\.tar\.gz: member 'train/a/odd\.png' is a {word}"):
        load({"name": "imagefolder", "path": str(tmp_path / "tars")})


def test_oversized_extended_header_is_refused(tmp_path):
    small_folder(tmp_path / "imgs")
    pack(tmp_path / "imgs", tmp_path / "tars")
    info = tarfile.TarInfo("train/a/1.png")
    data = (tmp_path / "imgs" / "train" / "a" / "0.png").read_bytes()
    info.size, info.pax_headers = len(data), {"comment": "x" * (2 << 20)}  # tarfile would read 2 MB whole
    with tarfile.open(tmp_path / "tars" / "train.tar.gz", "w:gz", format=tarfile.PAX_FORMAT) as tf:
        tf.add(tmp_path / "imgs" / "train", arcname="train")
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"train\.tar\.gz: a header block .* declares \d+ bytes of extended header"):
        load({"name": "imagefolder", "path": str(tmp_path / "tars")})


@pytest.fixture
def shards_out(tmp_path):
    small_folder(tmp_path / "imgs")
    write_shards(make_source({"name": "imagefolder", "path": str(tmp_path / "imgs")}), tmp_path / "out")
    return tmp_path / "out"


def rewrite_train_shard(out: Path, members) -> None:
    """Replace the train shard by `members` and fix its recorded size, as a hostile writer would."""
    shard = out / "train-00000.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, data)
    index = json.loads((out / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["bytes"] = shard.stat().st_size
    (out / "index.json").write_text(json.dumps(index))


def test_shard_reader_refuses_oversized_members(shards_out):
    with pytest.raises(DataError, match=r"train-00000\.tar:train-00000000\.png: \d+ bytes, more than the 2e-05 MB"
                                        r".*raise max_image_mb"):
        list(ShardReader(shards_out, "train", batch_size=2, max_image_mb=0.00002).worker_batches(0, 1))
    with pytest.raises(DataError, match=r"data\.sources\.x\.max_image_mb"):
        load({"name": "shards", "path": str(shards_out), "max_image_mb": 0.00002}, where="data.sources.x")


def test_shard_reader_refuses_sparse_members(shards_out):
    with tarfile.open(shards_out / "train-00000.tar") as tf:
        good = [(m, io.BytesIO(tf.extractfile(m).read())) for m in tf]
    rewrite_train_shard(shards_out, [sparse_member("train-00000009.png"), *good])
    with pytest.raises(DataError, match=r"member 'train-00000009\.png' is a sparse file"):
        list(ShardReader(shards_out, "train", batch_size=2).worker_batches(0, 1))


def test_shard_label_must_be_an_integer(shards_out):
    with tarfile.open(shards_out / "train-00000.tar") as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf]
    fixed = []
    for m, data in members:
        if m.name.endswith(".json"):
            meta = json.loads(data)
            meta["labels"] = {k: 1.5 for k in meta["labels"]}
            data = json.dumps(meta).encode()
            m.size = len(data)
        fixed.append((m, io.BytesIO(data)))
    rewrite_train_shard(shards_out, fixed)
    with pytest.raises(DataError, match=r"task 'class' label 1\.5 is not an integer class index"):
        list(ShardReader(shards_out, "train", batch_size=2).worker_batches(0, 1))


@pytest.mark.parametrize("escape", ["../outside.tar", "ABS", "sub/train-00000.tar", "link.tar"])
def test_index_cannot_point_outside_the_shard_folder(shards_out, escape):
    outside = shards_out.parent / "outside.tar"
    outside.write_bytes((shards_out / "train-00000.tar").read_bytes())  # a valid shard, elsewhere
    (shards_out / "sub").mkdir()
    (shards_out / "sub" / "train-00000.tar").write_bytes(outside.read_bytes())
    os.symlink(outside, shards_out / "link.tar")
    index = json.loads((shards_out / "index.json").read_text())
    index["splits"]["train"]["shards"][0]["file"] = str(outside) if escape == "ABS" else escape
    (shards_out / "index.json").write_text(json.dumps(index))
    message = r"is a link to .*outside\.tar, outside" if escape == "link.tar" else r"is not a file name in"
    with pytest.raises(DataError, match=rf"index\.json: shard .* {message}"):
        ShardReader(shards_out, "train")


# ----------------------------------------------------------------------------------------------------
# 15. labels: integers only, declared classes enforced, inferred classes reported

def npz_dir(root: Path, train_labels, test_labels=(0, 1)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        labels = np.asarray(labels)
        np.savez(root / f"{split}-00.npz", images=np.zeros((len(labels), 2, 2, 1), np.uint8), y=labels)
    return root


def test_npz_float_label_is_refused_not_truncated(tmp_path):
    root = npz_dir(tmp_path, np.array([0, 1, 1.5, 2]))
    with pytest.raises(DataError, match=r"tasks\.y, key 'y': task 'y' label 1\.5 at row 2 of "
                                        r".*train-00\.npz is not an integer class index"):
        load({"name": "npz", "path": str(root), "tasks": ["y"]})
    np.savez(root / "train-00.npz", images=np.zeros((2, 2, 2, 1), np.uint8), y=np.array([0.0, 1.0]))
    np.testing.assert_array_equal(load({"name": "npz", "path": str(root), "tasks": ["y"]}).train.labels["y"], [0, 1])


def test_npz_declared_classes_refuse_a_stray_value(tmp_path):
    root = npz_dir(tmp_path, [0, 1, 2, 9, 1])
    inferred = load({"name": "npz", "path": str(root), "tasks": ["y"]})
    assert inferred.tasks[0].num_classes == 10
    assert inferred.warnings == ["data.source.tasks.y, key 'y': 10 classes (0..9) inferred from the largest training "
                                 "label; 6 of them have no training rows: 3, 4, 5, 6, 7, 8; declare "
                                 "data.source.tasks.y.num_classes (or classes) to refuse any other value"]
    for decl in ({"num_classes": 3}, {"classes": ["a", "b", "c"]}):
        with pytest.raises(DataError, match=r"key 'y': task 'y' label 9 at row 3 of .*train-00\.npz is out of "
                                            r"range; expected 0\.\.2"):
            load({"name": "npz", "path": str(root), "tasks": {"y": decl}})
    npz_dir(tmp_path, [0, 1, 2, 1])
    declared = load({"name": "npz", "path": str(root), "tasks": {"y": {"num_classes": 4}}})
    assert declared.tasks[0].classes == ["0", "1", "2", "3"] and declared.warnings == []
    with pytest.raises(ConfigError, match=r"tasks\.y: num_classes is 4 but classes names 3"):
        load({"name": "npz", "path": str(root), "tasks": {"y": {"num_classes": 4, "classes": ["a", "b", "c"]}}})


def csv_dir(root: Path, train_rows: str, test_rows: str = "i0.png,a\n") -> dict:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(4):
        Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / "images" / f"i{i}.png")
    (root / "train.csv").write_text("image,kind\n" + train_rows)
    (root / "test.csv").write_text("image,kind\n" + test_rows)
    return {"name": "csv", "images": str(root / "images"), "csv": str(root / "train.csv"),
            "test_csv": str(root / "test.csv"), "tasks": ["kind"]}


def test_csv_inferred_classes_are_reported_and_declared_ones_enforced(tmp_path):
    spec = csv_dir(tmp_path, "i0.png,a\ni1.png,b\ni2.png,a\ni3.png,x\n")
    data = load(spec)
    assert data.tasks[0].classes == ["a", "b", "x"]
    assert data.warnings == ["data.source.tasks.kind: 3 classes inferred from column 'kind' of the training rows: "
                             "'a', 'b', 'x' (fewest rows: 'b', 1); declare data.source.tasks.kind.classes to refuse "
                             "any other value"]
    with pytest.raises(DataError, match=r"train\.csv line 5: task 'kind' value 'x' is not a known class "
                                        r"\(column 'kind'\); expected one of 'a', 'b'"):
        load(spec | {"tasks": {"kind": {"classes": ["a", "b"]}}})


# ----------------------------------------------------------------------------------------------------
# 20. CSV image paths stay inside the images folder

@pytest.mark.parametrize("path", ["../outside.png", "ABS", "sub/../../outside.png"])
def test_csv_path_outside_the_images_folder(tmp_path, path):
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "outside.png")
    cell = str(tmp_path / "outside.png") if path == "ABS" else path
    spec = csv_dir(tmp_path, f"i0.png,a\n{cell},b\n", "i2.png,a\n")
    (tmp_path / "images" / "sub").mkdir()
    with pytest.raises(DataError, match=r"train\.csv line 3: image path .*outside\.png' points outside the images "
                                        r"folder .*set data\.source\.allow_outside_root: true"):
        load(spec)
    assert len(load(spec | {"allow_outside_root": True}).train) == 2


# ----------------------------------------------------------------------------------------------------
# 21. what an imagefolder ignores is reported once, also from the cache

def test_imagefolder_reports_what_it_ignores(tmp_path):
    small_folder(tmp_path / "imgs")
    train = tmp_path / "imgs" / "train"
    (train / "empty_class").mkdir()
    (train / "notes.txt").write_text("x")
    (train / "stray.png").write_bytes((train / "a" / "0.png").read_bytes())
    (train / "a" / "labels.csv").write_text("x")
    (train / "a" / "more").mkdir()
    expected = [f"data.source: {train}: 2 file(s) outside the class folders, ignored: notes.txt, stray.png",
                f"data.source: {train}: 1 class folder(s) without image files, not used as classes: empty_class",
                f"data.source: {train}: 2 entr(ies) in class folders that are not image files (.bmp, .gif, .jpeg, .jpg,"
                " .png, .ppm, .tif, .tiff, .webp) or are subfolders, ignored: a/labels.csv, a/more"]
    source = make_source({"name": "imagefolder", "path": str(tmp_path / "imgs")})
    for _ in range(2):  # built, then read from the cache: the same warnings
        assert load_source("f", source, None, None, tmp_path / "cache").warnings == expected
    pack(tmp_path / "imgs", tmp_path / "tars")
    tar = tmp_path / "tars" / "train.tar.gz"
    packed = load({"name": "imagefolder", "path": str(tmp_path / "tars")})
    assert packed.tasks[0].classes == ["a", "b"]  # train/stray.png is not a class named "train"
    assert packed.warnings == [
        f"data.source: {tar}: 2 file(s) outside the class folders, ignored: train/notes.txt, train/stray.png",
        f"data.source: {tar}: 1 class folder(s) without image files, not used as classes: train/empty_class",
        f"data.source: {tar}: 2 entr(ies) in class folders that are not image files (.bmp, .gif, .jpeg, .jpg, .png, "
        ".ppm, .tif, .tiff, .webp) or are subfolders, ignored: train/a/labels.csv, train/a/more/"]


# ----------------------------------------------------------------------------------------------------
# the source's config key in messages

def test_messages_name_the_sources_config_key(tmp_path):
    with pytest.raises(DataError, match=r"data\.sources\.fmnist\.path: path .* does not exist"):
        load({"name": "npz", "path": str(tmp_path / "nowhere"), "tasks": ["y"]}, where="data.sources.fmnist")
    spec = csv_dir(tmp_path, "i0.png,a\n../x.png,b\n")
    with pytest.raises(DataError, match=r"set data\.sources\.mine\.allow_outside_root"):
        load(spec, where="data.sources.mine")


# ----------------------------------------------------------------------------------------------------
# 8. a killed cache build's temp folder is removed by the next build of that key, and only then

KILLED_BUILD = """
import os, signal, sys
import numpy as np
import mtlvision.data.cache as cache
from mtlvision.data import SOURCES
real = np.save
def save_then_die(path, arr):
    real(path, arr)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-build, with one split written
cache.np.save = save_then_die
spec = SOURCES.spec({"name": "npz", "path": sys.argv[1], "tasks": ["y"]}, "data.source")
cache.load_source("n", SOURCES.build(spec), None, None, cache.Path(sys.argv[2]))
"""


def test_killed_cache_build_leaves_nothing_behind(tmp_path):
    root = npz_dir(tmp_path / "d", [0, 1, 1, 0])
    cache_root = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(root), str(cache_root)], env=env)
    assert proc.returncode == -9
    (temp,) = [p for p in cache_root.iterdir() if p.name.startswith(".n-")]
    assert (temp / "train_images.npy").is_file()  # what a killed build leaves today: a hidden folder
    other = cache_root / ".n-00000000000000000000.abcdefgh.tmp"  # another key's build: not ours to remove
    other.mkdir()
    source = make_source({"name": "npz", "path": str(root), "tasks": ["y"]})
    data = load_source("n", source, None, None, cache_root)
    assert len(data.train) == 4 and not temp.exists() and other.is_dir()
    assert sorted(p.name for p in cache_root.iterdir()) == sorted([".locks", other.name, temp.name.split(".")[1]])


def test_cache_build_waits_for_a_live_build_of_the_same_key(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    root = npz_dir(tmp_path / "d", [0, 1, 1, 0])
    source = make_source({"name": "npz", "path": str(root), "tasks": ["y"]})
    cache_root = tmp_path / "cache"
    from mtlvision.data.cache import cache_key
    name = f"n-{cache_key('n', source, None, None)}"
    live = cache_root / f".{name}.live0000.tmp"  # a build in progress in another process
    live.mkdir(parents=True)
    (cache_root / ".locks").mkdir()
    with open(cache_root / ".locks" / f"{name}.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        result = []
        t = threading.Thread(target=lambda: result.append(load_source("n", source, None, None, cache_root)))
        t.start()
        time.sleep(0.5)
        assert t.is_alive() and live.is_dir()  # waits, and leaves the live build's folder alone
    # the lock is free: a build that still had a temp folder was killed, and its folder goes
    t.join(timeout=60)
    assert not t.is_alive() and len(result[0].train) == 4 and not live.exists()
