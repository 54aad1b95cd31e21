"""Data sources (imagefolder, csv, npz, cifar10/100, multimnist, shapes) and `build_data`, on tiny
files made in tmp_path: no network and no shared datasets."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets

from mtlvision.config import load_config
from mtlvision.data import SOURCES, build_data
from mtlvision.data.decode import decode_all
from mtlvision.data.sources.npz import NpzSource
from mtlvision.errors import ConfigError, DataError
from mtlvision.tasks import MISSING


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """A cache private to each test, so cache hits never leak between tests."""
    monkeypatch.setenv("MTLVISION_CACHE", str(tmp_path / "cache"))


def make_cfg(source=None, *, seed=0, tasks=None, **data):
    raw = {"seed": seed, "data": ({"source": source} if source is not None else {}) | data}
    if tasks is not None:
        raw["tasks"] = tasks
    return load_config(data=raw)


def build(source=None, **kw):
    return build_data(make_cfg(source, **kw))


def load_raw(source: dict, image_size=None):
    """Run one source directly (no cache, no validation split), as build_data would construct it."""
    return SOURCES.build(SOURCES.spec(source, "data.source"), image_size=image_size).load()


def whole_train(stream):
    """train + val of a stream: the source's training split (in a different order)."""
    return (np.concatenate([stream.train.images, stream.val.images]),
            {k: np.concatenate([stream.train.labels[k], stream.val.labels[k]]) for k in stream.train.labels})


def cache_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


# ----------------------------------------------------------------------------------------------------
# imagefolder

# "cat" and "cat-wild": a class name that is a prefix of another, where plain string order of paths
# ("cat-wild/..." < "cat/...") and path order ("cat" < "cat-wild") disagree.
CLASSES = ["cat", "cat-wild", "dog"]
SPLIT_SIZES = {"train": 3, "test": 2}


def folder_image(ci: int, j: int, split: str, h: int = 8, w: int = 8) -> np.ndarray:
    """Red channel encodes (class, index), green a spatial gradient, blue the split."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 40 * ci + 4 * j + 1
    a[..., 1] = (np.arange(h * w).reshape(h, w) * 3) % 256
    a[..., 2] = 100 if split == "train" else 200
    return a


def make_imagefolder(root: Path, classes=CLASSES, sizes=SPLIT_SIZES) -> dict:
    """root/{train,test}/<class>/NN.png; returns the expected (images, labels) per split in file order."""
    expected = {}
    for split, n in sizes.items():
        imgs, labels = [], []
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                a = folder_image(ci, j, split)
                Image.fromarray(a).save(root / split / c / f"{j:02d}.png")
                imgs.append(a)
                labels.append(ci)
        expected[split] = (np.stack(imgs), np.array(labels))
    return expected


def pack_tars(src: Path, dst: Path) -> None:
    """train.tar.gz / test.tar.gz with members "<split>/<class>/<file>", stored in reverse order."""
    dst.mkdir()
    for split in ("train", "test"):
        with tarfile.open(dst / f"{split}.tar.gz", "w:gz") as tf:
            for p in sorted((src / split).rglob("*"), reverse=True):
                tf.add(p, arcname=str(p.relative_to(src)), recursive=False)


def test_imagefolder_tasks_labels_and_pixels(tmp_path):
    expected = make_imagefolder(tmp_path / "imgs")
    source = {"name": "imagefolder", "path": str(tmp_path / "imgs"), "task": "animal", "flip_ok": False}

    raw = load_raw(source)
    assert [t.name for t in raw.tasks] == ["animal"] and raw.tasks[0].classes == CLASSES
    assert raw.tasks[0].flip_ok is False
    for split in ("train", "test"):
        s = getattr(raw, split)
        np.testing.assert_array_equal(s.images, expected[split][0])
        np.testing.assert_array_equal(s.labels["animal"], expected[split][1])
        assert s.labels["animal"].dtype == np.int64
    assert raw.skipped == []

    b = build(source, val_fraction=0.34)
    (stream,) = b.groups
    assert [t.name for t in b.tasks] == ["animal"] and stream.flip is False
    assert b.image_shape == (8, 8, 3)
    assert (len(stream.train), len(stream.val), len(stream.test)) == (6, 3, 6)
    np.testing.assert_array_equal(stream.test.images, expected["test"][0])
    np.testing.assert_array_equal(stream.test.labels["animal"], expected["test"][1])
    imgs, labels = whole_train(stream)
    np.testing.assert_array_equal(labels["animal"], imgs[:, 0, 0, 0] // 40)  # label matches its pixels
    assert sorted(imgs[:, 0, 0, 0]) == sorted(expected["train"][0][:, 0, 0, 0])
    assert (imgs[..., 2] == 100).all()
    # normalisation statistics come from the training images
    x = stream.train.images.astype(np.float64) / 255
    np.testing.assert_allclose(b.mean, x.reshape(-1, 3).mean(0), atol=1e-9)


def test_imagefolder_tar_gives_identical_arrays(tmp_path):
    make_imagefolder(tmp_path / "plain")
    pack_tars(tmp_path / "plain", tmp_path / "packed")
    plain = load_raw({"name": "imagefolder", "path": str(tmp_path / "plain")})
    packed = load_raw({"name": "imagefolder", "path": str(tmp_path / "packed")})
    assert packed.tasks[0].classes == plain.tasks[0].classes == CLASSES
    for split in ("train", "test"):
        a, b = getattr(plain, split), getattr(packed, split)
        np.testing.assert_array_equal(b.images, a.images)
        np.testing.assert_array_equal(b.labels["class"], a.labels["class"])

    # members without the split prefix ("<class>/<file>") work too, and through build_data
    (tmp_path / "flat").mkdir()
    for split in ("train", "test"):
        with tarfile.open(tmp_path / "flat" / f"{split}.tgz", "w:gz") as tf:
            for c in CLASSES:
                tf.add(tmp_path / "plain" / split / c, arcname=c)
    bundle = build({"name": "imagefolder", "path": str(tmp_path / "flat")})
    np.testing.assert_array_equal(bundle.groups[0].test.images, plain.test.images)


def test_imagefolder_corrupt_image(tmp_path):
    root = tmp_path / "imgs"  # not tmp_path itself: the cache lives there and would change the fingerprint
    make_imagefolder(root)
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    source = {"name": "imagefolder", "path": str(root)}
    with pytest.raises(DataError, match=r"broken\.png.*cannot decode"):
        build(source)

    for _ in range(2):  # the second build comes from the cache and must keep the skipped list
        b = build(source | {"skip_corrupt": True})
        assert b.skipped == [str(bad)]
        assert len(b.groups[0].train) + len(b.groups[0].val) == 3 * len(CLASSES)
    assert len(cache_entries(tmp_path / "cache")) == 1

    # in a tar, the message names the archive and the member
    pack_tars(root, tmp_path / "packed")
    with pytest.raises(DataError, match=r"train\.tar\.gz:train/dog/broken\.png"):
        load_raw({"name": "imagefolder", "path": str(tmp_path / "packed")})


def test_imagefolder_all_images_corrupt(tmp_path):
    make_imagefolder(tmp_path, classes=["a", "b"], sizes={"train": 1, "test": 1})
    for p in (tmp_path / "test").glob("*/*.png"):
        p.write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable images"):
        load_raw({"name": "imagefolder", "path": str(tmp_path), "skip_corrupt": True})


def test_imagefolder_class_folders_differ(tmp_path):
    make_imagefolder(tmp_path)
    (tmp_path / "test" / "zebra").mkdir()
    Image.fromarray(folder_image(0, 0, "test")).save(tmp_path / "test" / "zebra" / "z.png")
    with pytest.raises(DataError, match=r"only in test: \['zebra'\]"):
        build({"name": "imagefolder", "path": str(tmp_path)})


def test_imagefolder_missing_split_and_path(tmp_path):
    make_imagefolder(tmp_path / "d", sizes={"train": 1})
    with pytest.raises(DataError, match="no test/ folder and no test.tar.gz"):
        build({"name": "imagefolder", "path": str(tmp_path / "d")})
    with pytest.raises(DataError, match=r"data\.source\.path.*does not exist"):
        build({"name": "imagefolder", "path": str(tmp_path / "nowhere")})


def test_imagefolder_mixed_sizes(tmp_path):
    make_imagefolder(tmp_path)
    odd = folder_image(2, 9, "train", h=8, w=16)
    odd[:, :4, 0] = odd[:, 12:, 0] = 255  # only the centre 8 columns survive a centre crop
    Image.fromarray(odd).save(tmp_path / "train" / "dog" / "wide.png")
    source = {"name": "imagefolder", "path": str(tmp_path)}
    with pytest.raises(DataError, match=r"wide\.png: image is 16x8.*data\.image_size"):
        build(source)

    b = build(source, image_size=8)
    imgs, labels = whole_train(b.groups[0])
    assert imgs.shape == (10, 8, 8, 3) and b.image_shape == (8, 8, 3)
    # uniform channels survive the resize + centre crop, so labels still match their pixels
    np.testing.assert_array_equal(labels["class"], imgs[:, 0, 0, 0] // 40)
    assert (imgs[..., 2] == 100).all()
    (k,) = np.flatnonzero(imgs[:, 0, 0, 0] == 40 * 2 + 4 * 9 + 1)
    np.testing.assert_array_equal(imgs[k], odd[:, 4:12])  # short side to 8, then a centre crop

    small = build(source, image_size=4, channels=1)
    assert small.image_shape == (4, 4, 1)
    assert len(cache_entries(tmp_path / "cache")) == 2  # another image spec, another entry


def test_imagefolder_grayscale_source_channels(tmp_path):
    make_imagefolder(tmp_path, sizes={"train": 2, "test": 1})
    raw = load_raw({"name": "imagefolder", "path": str(tmp_path), "channels": 1})
    assert raw.train.images.shape == (6, 8, 8, 1)
    ref = np.asarray(Image.fromarray(folder_image(0, 0, "train")).convert("L"))
    np.testing.assert_array_equal(raw.train.images[0, ..., 0], ref)
    with pytest.raises(DataError, match="channels"):
        load_raw({"name": "imagefolder", "path": str(tmp_path), "channels": 4})


def test_imagefolder_corrupt_tar(tmp_path):
    make_imagefolder(tmp_path / "plain")
    pack_tars(tmp_path / "plain", tmp_path / "packed")
    tar = tmp_path / "packed" / "train.tar.gz"
    whole = tar.read_bytes()
    for blob in (b"not a tar archive" * 10, whole[:len(whole) // 2]):  # junk, truncated download
        tar.write_bytes(blob)
        with pytest.raises(DataError, match=r"train\.tar\.gz: cannot read archive"):
            load_raw({"name": "imagefolder", "path": str(tmp_path / "packed")})


def test_decode_unreadable_file(tmp_path):
    Image.fromarray(folder_image(0, 0, "train")).save(tmp_path / "a.png")

    def unreadable() -> bytes:
        raise PermissionError(13, "Permission denied")

    items = [("a.png", (tmp_path / "a.png").read_bytes), ("b.png", unreadable)]
    with pytest.raises(DataError, match=r"b\.png: cannot read file \(PermissionError"):
        decode_all(items, None, 3, skip_corrupt=False, skipped=[])
    skipped: list[str] = []
    imgs, kept = decode_all(items, None, 3, skip_corrupt=True, skipped=skipped)
    assert kept == [0] and skipped == ["b.png"] and imgs.shape == (1, 8, 8, 3)


# ----------------------------------------------------------------------------------------------------
# csv

def make_csv_images(folder: Path, n: int) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    imgs = np.stack([np.full((6, 6, 3), 10 * i + 5, np.uint8) for i in range(n)])
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(folder / f"i{i}.png")
    return imgs


def test_csv_two_tasks_and_missing_cells(tmp_path):
    imgs = make_csv_images(tmp_path / "images", 6)
    # i1 has an empty colour cell, i3 a short row (no shape cell at all)
    (tmp_path / "train.csv").write_text("image,color,shape\ni0.png,red,round\ni1.png,,square\n"
                                        "i2.png, green ,round\ni3.png,blue\n")
    (tmp_path / "test.csv").write_text("image,color,shape\ni4.png,blue,square\ni5.png,green,round\n")
    source = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "train.csv"),
              "test_csv": str(tmp_path / "test.csv"), "tasks": ["color", "shape"]}
    raw = load_raw(source)
    assert [(t.name, t.classes) for t in raw.tasks] == [("color", ["blue", "green", "red"]),
                                                        ("shape", ["round", "square"])]
    np.testing.assert_array_equal(raw.train.images, imgs[:4])
    np.testing.assert_array_equal(raw.test.images, imgs[4:])
    np.testing.assert_array_equal(raw.train.labels["color"], [2, MISSING, 1, 0])
    np.testing.assert_array_equal(raw.train.labels["shape"], [0, 1, 0, MISSING])
    np.testing.assert_array_equal(raw.test.labels["color"], [0, 1])
    np.testing.assert_array_equal(raw.test.labels["shape"], [1, 0])

    b = build(source, val_fraction=0.25)
    assert [t.name for t in b.tasks] == ["color", "shape"]
    assert (len(b.groups[0].train), len(b.groups[0].val)) == (3, 1)
    imgs_tr, labels = whole_train(b.groups[0])
    by_id = {int(v) // 10: k for k, v in enumerate(imgs_tr[:, 0, 0, 0])}
    assert [int(labels["color"][by_id[i]]) for i in range(4)] == [2, MISSING, 1, 0]


def test_csv_declared_classes_and_column(tmp_path):
    make_csv_images(tmp_path / "images", 4)
    (tmp_path / "train.csv").write_text("file,c\ni0.png,red\ni1.png,green\n")
    (tmp_path / "test.csv").write_text("file,c\ni2.png,green\ni3.png,blue\n")
    source = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "train.csv"),
              "test_csv": str(tmp_path / "test.csv"), "image_column": "file",
              "tasks": {"colour": {"column": "c", "classes": ["red", "green"], "flip_ok": False}}}
    with pytest.raises(DataError, match=r"test\.csv line 3: task 'colour' value 'blue' is not a known class"):
        load_raw(source)

    (tmp_path / "test.csv").write_text("file,c\ni2.png,green\ni3.png,red\n")
    raw = load_raw(source)
    assert raw.tasks[0].classes == ["red", "green"] and raw.tasks[0].flip_ok is False
    np.testing.assert_array_equal(raw.train.labels["colour"], [0, 1])  # declared order, not sorted
    np.testing.assert_array_equal(raw.test.labels["colour"], [1, 0])


def test_csv_missing_image_and_column(tmp_path):
    make_csv_images(tmp_path / "images", 3)
    (tmp_path / "train.csv").write_text("image,y\ni0.png,a\nnope.png,b\n")
    (tmp_path / "test.csv").write_text("image,y\ni2.png,a\n")
    source = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "train.csv"),
              "test_csv": str(tmp_path / "test.csv"), "tasks": ["y"]}
    with pytest.raises(DataError, match=r"train\.csv line 3: image file .*nope\.png does not exist"):
        load_raw(source)
    with pytest.raises(DataError, match=r"missing column\(s\) \['z'\]"):
        load_raw(source | {"tasks": ["y", "z"]})


def test_csv_split_column(tmp_path):
    imgs = make_csv_images(tmp_path / "images", 5)
    (tmp_path / "all.csv").write_text("image,split,kind\ni0.png,train,x\ni1.png,test,y\ni2.png,train,y\n"
                                      "i3.png, test ,x\ni4.png,train,x\n")
    source = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "all.csv"),
              "split_column": "split", "tasks": ["kind"]}
    raw = load_raw(source)
    np.testing.assert_array_equal(raw.train.images, imgs[[0, 2, 4]])
    np.testing.assert_array_equal(raw.test.images, imgs[[1, 3]])
    np.testing.assert_array_equal(raw.train.labels["kind"], [0, 1, 0])
    np.testing.assert_array_equal(raw.test.labels["kind"], [1, 0])

    with pytest.raises(DataError, match="test_csv or split_column"):
        load_raw({k: v for k, v in source.items() if k != "split_column"})
    (tmp_path / "all.csv").write_text("image,split,kind\ni0.png,train,x\ni1.png,train,y\n")
    with pytest.raises(DataError, match="the test split has no rows"):
        load_raw(source)


def test_csv_test_value_not_in_training_rows(tmp_path):
    make_csv_images(tmp_path / "images", 4)
    (tmp_path / "train.csv").write_text("image,c\ni0.png,red\ni1.png,green\n")
    (tmp_path / "test.csv").write_text("image,c\ni2.png,green\ni3.png,blue\n")
    source = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "train.csv"),
              "test_csv": str(tmp_path / "test.csv"), "tasks": ["c"]}
    with pytest.raises(DataError, match=r"test\.csv line 3: task 'c' value 'blue' is not a known class"):
        load_raw(source)
    raw = load_raw(source | {"tasks": {"c": {"classes": ["red", "green", "blue"]}}})
    np.testing.assert_array_equal(raw.test.labels["c"], [1, 2])

    # with a split column, too: the class list comes from train and val rows only
    (tmp_path / "all.csv").write_text("image,split,c\ni0.png,train,red\ni1.png,val,green\n"
                                      "i2.png,train,red\ni3.png,test,blue\n")
    split = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "all.csv"),
             "split_column": "split", "tasks": ["c"]}
    with pytest.raises(DataError, match=r"all\.csv line 5: task 'c' value 'blue'"):
        load_raw(split)


def test_csv_encoding(tmp_path):
    make_csv_images(tmp_path / "images", 3)
    source = {"name": "csv", "images": str(tmp_path / "images"), "csv": str(tmp_path / "train.csv"),
              "test_csv": str(tmp_path / "test.csv"), "tasks": ["y"]}
    # Excel writes a byte-order mark before the header
    (tmp_path / "train.csv").write_text("image,y\ni0.png,a\ni1.png,b\n", encoding="utf-8-sig")
    (tmp_path / "test.csv").write_text("image,y\ni2.png,a\n", encoding="utf-8-sig")
    np.testing.assert_array_equal(load_raw(source).train.labels["y"], [0, 1])

    (tmp_path / "test.csv").write_bytes("image,y\ni2.png,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"test\.csv: cannot read CSV .*expected a UTF-8 text file"):
        load_raw(source)


# ----------------------------------------------------------------------------------------------------
# npz

def id_images(ids, size: int = 4) -> np.ndarray:
    """Images whose every pixel is the row id, so rows can be traced through splits."""
    a = np.zeros((len(ids), size, size, 3), np.uint8)
    a[...] = np.asarray(ids, np.uint8)[:, None, None, None]
    return a


AGES = np.array([-1, 0, 5, 10, 19, 20, 25, 3, 12, 30], np.int16)
AGE_GROUPS = [MISSING, 0, 0, 1, 1, MISSING, MISSING, 0, 1, MISSING]  # bins [0, 10, 20]


def make_npz(root: Path, meta: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(10)
    np.savez(root / "train-00.npz", images=id_images(ids[:6]), label=(ids[:6] % 3).astype(np.uint8), age=AGES[:6])
    np.savez(root / "train-01.npz", images=id_images(ids[6:]), label=(ids[6:] % 3).astype(np.uint8), age=AGES[6:])
    np.savez(root / "test-00.npz", images=id_images([100, 101]), label=np.array([2, 0], np.uint8),
             age=np.array([15, 99], np.int16))
    if meta:
        (root / "meta.json").write_text(json.dumps(
            {"label_kinds": {"label": {"num_classes": 3, "names": ["zero", "one", "two"]}}}))


def test_npz_tasks_as_list_and_meta_names(tmp_path):
    make_npz(tmp_path)
    raw = load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})
    assert [(t.name, t.classes) for t in raw.tasks] == [("label", ["zero", "one", "two"])]
    np.testing.assert_array_equal(raw.train.images[:, 0, 0, 0], np.arange(10))  # shards in order
    np.testing.assert_array_equal(raw.train.labels["label"], np.arange(10) % 3)
    np.testing.assert_array_equal(raw.test.labels["label"], [2, 0])
    assert raw.train.labels["label"].dtype == np.int64

    (tmp_path / "meta.json").unlink()  # without meta.json: classes "0".."max"
    raw = load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})
    assert raw.tasks[0].classes == ["0", "1", "2"]


def test_npz_tasks_as_dict_with_bins(tmp_path):
    make_npz(tmp_path)
    source = {"name": "npz", "path": str(tmp_path),
              "tasks": {"digit": {"key": "label", "flip_ok": False}, "age_group": {"key": "age", "bins": [0, 10, 20]}}}
    raw = load_raw(source)
    assert [(t.name, t.classes, t.flip_ok) for t in raw.tasks] == [
        ("digit", ["zero", "one", "two"], False), ("age_group", ["0-10", "10-20"], True)]
    np.testing.assert_array_equal(raw.train.labels["age_group"], AGE_GROUPS)
    np.testing.assert_array_equal(raw.test.labels["age_group"], [1, MISSING])
    np.testing.assert_array_equal(raw.train.labels["digit"], np.arange(10) % 3)

    named = load_raw(source | {"tasks": {"age_group": {"key": "age", "bins": [0, 10, 20], "classes": ["kid", "teen"]}}})
    assert named.tasks[0].classes == ["kid", "teen"]
    with pytest.raises(DataError, match="2 bins but 3 classes"):
        load_raw(source | {"tasks": {"a": {"key": "age", "bins": [0, 10, 20], "classes": ["x", "y", "z"]}}})

    b = build(source)
    assert [t.name for t in b.tasks] == ["digit", "age_group"] and b.groups[0].flip is False


def make_folds(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ids = np.arange(10)
    dup = np.zeros(10, bool)
    dup[[4, 7]] = True
    np.savez(root / "all-00.npz", images=id_images(ids), label=(ids % 2).astype(np.int8),
             fold=(ids % 3).astype(np.int8), is_duplicate=dup)


def test_npz_fold_split_and_drop_key(tmp_path):
    make_folds(tmp_path)
    source = {"name": "npz", "path": str(tmp_path), "tasks": ["label"], "train_split": "all",
              "fold_key": "fold", "drop_key": "is_duplicate"}
    raw = load_raw(source)
    np.testing.assert_array_equal(raw.test.images[:, 0, 0, 0], [0, 3, 6, 9])  # fold 0
    np.testing.assert_array_equal(raw.train.images[:, 0, 0, 0], [1, 2, 5, 8])  # 4, 7 are duplicates
    np.testing.assert_array_equal(raw.train.labels["label"], [1, 0, 1, 0])

    raw = load_raw(source | {"test_folds": [1, 2], "drop_key": None})
    np.testing.assert_array_equal(raw.test.images[:, 0, 0, 0], [1, 2, 4, 5, 7, 8])
    np.testing.assert_array_equal(raw.train.images[:, 0, 0, 0], [0, 3, 6, 9])

    with pytest.raises(DataError, match=r"fold_key 'split' is not a key"):
        load_raw(source | {"fold_key": "split"})
    with pytest.raises(DataError, match=r"drop_key 'dup'.*keys: .*is_duplicate"):
        load_raw(source | {"drop_key": "dup"})


def test_npz_drop_key_without_folds(tmp_path):
    make_npz(tmp_path)
    for split, n in (("train", 3), ("test", 2)):
        z = dict(np.load(tmp_path / f"{split}-00.npz"))
        z["dup"] = np.arange(len(z["images"])) == 1
        np.savez(tmp_path / f"{split}-00.npz", **z)
    z = dict(np.load(tmp_path / "train-01.npz"))
    z["dup"] = np.zeros(len(z["images"]), bool)
    np.savez(tmp_path / "train-01.npz", **z)
    raw = load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"], "drop_key": "dup"})
    np.testing.assert_array_equal(raw.train.images[:, 0, 0, 0], [0, 2, 3, 4, 5, 6, 7, 8, 9])
    np.testing.assert_array_equal(raw.test.images[:, 0, 0, 0], [100])


def test_npz_label_out_of_range(tmp_path):
    make_npz(tmp_path)
    np.savez(tmp_path / "test-00.npz", images=id_images([1, 2]), label=np.array([1, 5], np.uint8),
             age=np.array([1, 2], np.int16))
    with pytest.raises(DataError, match=r"tasks\.label, key 'label': task 'label' label 5 at row 1 of "
                                        r".*test-00\.npz is out of range; expected 0\.\.2"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})


def test_npz_missing_key_and_files(tmp_path):
    make_npz(tmp_path)
    with pytest.raises(DataError, match=r"tasks\.colour: key 'colour' not in .*keys: \['age', 'label'\]"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["colour"]})
    with pytest.raises(DataError, match=r"no files val-\*\.npz"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"], "test_split": "val"})
    np.savez(tmp_path / "test-00.npz", pixels=id_images([1]), label=np.array([1], np.uint8))
    with pytest.raises(DataError, match=r"test-00\.npz: has no 'images' array"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})
    (tmp_path / "test-00.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"test-00\.npz: cannot read npz shard"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})


def test_npz_inconsistent_keys(tmp_path):
    make_npz(tmp_path)
    ages = {"name": "npz", "path": str(tmp_path), "tasks": {"a": {"key": "age", "bins": [0, 10, 20]}}}
    np.savez(tmp_path / "test-00.npz", images=id_images([1]), label=np.array([1], np.uint8))
    with pytest.raises(DataError, match=r"tasks\.a: key 'age' is in .*train-\*\.npz but not in .*test-\*\.npz"):
        load_raw(ages)

    np.savez(tmp_path / "train-01.npz", images=id_images([7]), label=np.array([1], np.uint8))
    with pytest.raises(DataError, match=r"train-01\.npz: keys \['images', 'label'\] differ from .*train-00\.npz"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})


def test_npz_bad_bins_meta_and_images(tmp_path):
    make_npz(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.source\.tasks\.a\.bins: expected strictly increasing"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": {"a": {"key": "age", "bins": [0, 20, 10]}}})

    for text in ('{"label_kinds": {"label": ', '["label"]'):
        (tmp_path / "meta.json").write_text(text)
        with pytest.raises(DataError, match=r"meta\.json: (not valid JSON|expected)"):
            load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})
    (tmp_path / "meta.json").unlink()

    np.savez(tmp_path / "test-00.npz", images=id_images([1, 2]).astype(np.float32), label=np.array([1, 0], np.uint8),
             age=np.array([1, 2], np.int16))
    with pytest.raises(DataError, match=r"test-00\.npz: 'images' is float32 \(2, 4, 4, 3\); expected uint8"):
        load_raw({"name": "npz", "path": str(tmp_path), "tasks": ["label"]})


# ----------------------------------------------------------------------------------------------------
# cifar10 / cifar100 (official python pickle format)

def _dump(path: Path, obj) -> list[str]:
    with path.open("wb") as f:
        pickle.dump(obj, f)
    return [path.name, hashlib.md5(path.read_bytes()).hexdigest()]


def _chw_to_nhwc(data: np.ndarray) -> np.ndarray:
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.fixture
def cifar10_root(tmp_path, monkeypatch):
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (13, 3072), dtype=np.uint8)
    labels = [3, 0, 9, 1, 2, 4, 5, 6, 7, 8, 9, 0, 1]
    train_list = [_dump(folder / f"data_batch_{i + 1}",
                        {"batch_label": f"training batch {i + 1} of 5", "data": data[2 * i:2 * i + 2],
                         "labels": labels[2 * i:2 * i + 2], "filenames": ["a.png", "b.png"]}) for i in range(5)]
    test_list = [_dump(folder / "test_batch", {"data": data[10:], "labels": labels[10:]})]
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _, meta_md5 = _dump(folder / "batches.meta", {"label_names": names, "num_vis": 3072})
    monkeypatch.setattr(datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(datasets.CIFAR10, "test_list", test_list)
    monkeypatch.setattr(datasets.CIFAR10, "meta", dict(datasets.CIFAR10.meta, md5=meta_md5))
    return tmp_path / "c10", data, np.array(labels), names


def test_cifar10(cifar10_root):
    root, data, labels, names = cifar10_root
    raw = load_raw({"name": "cifar10", "root": str(root)})
    assert [(t.name, t.classes) for t in raw.tasks] == [("class", names)]
    np.testing.assert_array_equal(raw.train.images, _chw_to_nhwc(data[:10]))
    np.testing.assert_array_equal(raw.train.labels["class"], labels[:10])
    np.testing.assert_array_equal(raw.test.images, _chw_to_nhwc(data[10:]))
    np.testing.assert_array_equal(raw.test.labels["class"], labels[10:])

    b = build({"name": "cifar10", "root": str(root)}, val_fraction=0.2)
    assert b.image_shape == (32, 32, 3) and (len(b.groups[0].train), len(b.groups[0].val)) == (8, 2)
    np.testing.assert_array_equal(b.groups[0].test.images, _chw_to_nhwc(data[10:]))


def test_cifar10_corrupted_file(cifar10_root):
    root = cifar10_root[0]
    with (root / "cifar-10-batches-py" / "data_batch_3").open("ab") as f:
        f.write(b"x")
    with pytest.raises(DataError, match="download: true"):
        load_raw({"name": "cifar10", "root": str(root)})


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing_folder(tmp_path, name):
    with pytest.raises(DataError, match=r"cifar-(10-batches|100)-py.*download: true"):
        build({"name": name, "root": str(tmp_path / "empty")})


def test_cifar_download_fails(tmp_path, monkeypatch):
    def offline(self):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(DataError, match=r"could not reach https://\S+cifar-10-python\.tar\.gz .*download: false"):
        load_raw({"name": "cifar10", "root": str(tmp_path), "download": True})

    def unreadable(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(datasets.CIFAR10, "_check_integrity", unreadable)
    with pytest.raises(DataError, match=r"cannot read .*cifar-10-batches-py \(\[Errno 13\]"):
        load_raw({"name": "cifar10", "root": str(tmp_path)})


def test_cifar100_fine_and_coarse(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (6, 3072), dtype=np.uint8)
    fine, coarse = [99, 0, 42, 7, 13, 58], [19, 4, 0, 7, 18, 3]
    train = _dump(folder / "train", {"data": data[:4], "fine_labels": fine[:4], "coarse_labels": coarse[:4],
                                     "filenames": [b"x"] * 4, "batch_label": "training batch 1 of 1"})
    test = _dump(folder / "test", {"data": data[4:], "fine_labels": fine[4:], "coarse_labels": coarse[4:]})
    fine_names = [f"f{i:02d}" for i in range(100)]
    coarse_names = [f"c{i:02d}" for i in range(20)]
    _, meta_md5 = _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    monkeypatch.setattr(datasets.CIFAR100, "train_list", [train])
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [test])
    monkeypatch.setattr(datasets.CIFAR100, "meta", dict(datasets.CIFAR100.meta, md5=meta_md5))

    raw = load_raw({"name": "cifar100", "root": str(tmp_path)})
    assert [(t.name, t.classes) for t in raw.tasks] == [("fine", fine_names), ("coarse", coarse_names)]
    np.testing.assert_array_equal(raw.train.images, _chw_to_nhwc(data[:4]))
    np.testing.assert_array_equal(raw.train.labels["fine"], fine[:4])
    np.testing.assert_array_equal(raw.train.labels["coarse"], coarse[:4])
    np.testing.assert_array_equal(raw.test.labels["fine"], fine[4:])
    np.testing.assert_array_equal(raw.test.labels["coarse"], coarse[4:])

    b = build({"name": "cifar100", "root": str(tmp_path)}, val_fraction=0.25,
              tasks={"fine": {"enabled": False}})
    assert [t.name for t in b.tasks] == ["coarse"] and b.task("coarse").num_classes == 20
    np.testing.assert_array_equal(b.groups[0].test.labels["coarse"], coarse[4:])

    # a coarse label outside 0..19 names the task and the file
    test = _dump(folder / "test", {"data": data[4:], "fine_labels": fine[4:], "coarse_labels": [3, 20]})
    monkeypatch.setattr(datasets.CIFAR100, "test_list", [test])
    with pytest.raises(DataError, match=r"cifar-100-python/test: task 'coarse' label 20"):
        load_raw({"name": "cifar100", "root": str(tmp_path)})


# ----------------------------------------------------------------------------------------------------
# multimnist

def digit_value(label) -> np.ndarray:
    return 20 * np.asarray(label) + 15


def make_mnist(root: Path) -> dict[str, np.ndarray]:
    """A uniform 28x28 'digit' per image whose grey value encodes its label."""
    root.mkdir(parents=True)
    labels = {"train": np.array([0, 1, 2, 3, 4, 5, 6, 7], np.uint8), "test": np.array([9, 8, 7, 1], np.uint8)}
    for split, lab in labels.items():
        imgs = np.broadcast_to(digit_value(lab).astype(np.uint8)[:, None, None, None], (len(lab), 28, 28, 1))
        np.savez(root / f"{split}-00.npz", images=np.ascontiguousarray(imgs), label=lab)
    return labels


def test_multimnist(tmp_path):
    labels = make_mnist(tmp_path / "mnist")
    source = {"name": "multimnist", "path": str(tmp_path / "mnist"), "seed": 3}
    raw = load_raw(source)
    assert [(t.name, t.classes, t.flip_ok) for t in raw.tasks] == [
        ("left", [str(i) for i in range(10)], False), ("right", [str(i) for i in range(10)], False)]
    for split in ("train", "test"):
        s = getattr(raw, split)
        assert s.images.shape == (len(labels[split]), 28, 28, 1)
        left, right = s.labels["left"], s.labels["right"]
        np.testing.assert_array_equal(left, labels[split])
        assert sorted(right) == sorted(labels[split])  # right digits are a permutation of the set
        # the top-left corner shows only the left digit, the bottom-right only the right digit
        corner = (len(left), 5, 5)
        np.testing.assert_array_equal(s.images[:, :5, :5, 0], np.broadcast_to(digit_value(left)[:, None, None], corner))
        np.testing.assert_array_equal(s.images[:, -5:, -5:, 0],
                                      np.broadcast_to(digit_value(right)[:, None, None], corner))
        # where they overlap (the centre), the brighter digit wins
        np.testing.assert_array_equal(s.images[:, 14, 14, 0], digit_value(np.maximum(left, right)))
    assert (raw.train.labels["left"] != raw.train.labels["right"]).any()

    again = load_raw(source)  # deterministic for a seed
    np.testing.assert_array_equal(again.train.labels["right"], raw.train.labels["right"])
    b = build(source)
    assert b.groups[0].flip is False and b.image_shape == (28, 28, 1)


def test_multimnist_without_label(tmp_path):
    make_mnist(tmp_path / "mnist")
    z = dict(np.load(tmp_path / "mnist" / "test-00.npz"))
    np.savez(tmp_path / "mnist" / "test-00.npz", images=z["images"], digit=z["label"])
    with pytest.raises(DataError, match=r"test-\*\.npz: no 'label' array \(keys: \['digit', 'images'\]\)"):
        load_raw({"name": "multimnist", "path": str(tmp_path / "mnist")})


# ----------------------------------------------------------------------------------------------------
# build_data

SHAPES = {"name": "shapes", "n_train": 60, "n_test": 20, "size": 8}


def test_derive_groups(tmp_path):
    derive = {"roundness": {"source": "shape", "groups": {"round": ["circle"], "angular": ["square", "triangle"]}},
              "side": {"source": "position", "groups": {"left": ["top-left", "bottom-left"],
                                                        "right": ["top-right", "bottom-right"]}}}
    b = build(SHAPES, derive=derive)
    assert [t.name for t in b.tasks] == ["shape", "colour", "size", "position", "roundness", "side"]
    assert b.task("roundness").classes == ["round", "angular"] and b.task("roundness").flip_ok
    assert b.task("side").flip_ok is False  # derived from a task that a flip changes
    mapping = np.array([0, 1, 1, MISSING])  # circle, square, triangle, plus
    for s in (b.groups[0].train, b.groups[0].val, b.groups[0].test):
        np.testing.assert_array_equal(s.labels["roundness"], mapping[s.labels["shape"]])
        np.testing.assert_array_equal(s.labels["side"], s.labels["position"] % 2)
    assert (b.groups[0].train.labels["roundness"] == MISSING).any()

    with pytest.raises(ConfigError, match=r"'oval' is not a class of 'shape' \(classes: \['circle', 'square'"):
        build(SHAPES, derive={"r": {"source": "shape", "groups": {"round": ["circle", "oval"], "b": ["plus"]}}})
    with pytest.raises(ConfigError, match=r"data\.derive\.r\.groups: class 'circle' is in both 'round' and 'b'"):
        build(SHAPES, derive={"r": {"source": "shape", "groups": {"round": ["circle"], "b": ["plus", "circle"]}}})
    with pytest.raises(ConfigError, match=r"data\.derive\.size: the source already has a task named 'size'"):
        build(SHAPES, derive={"size": {"source": "shape", "groups": {"round": ["circle"], "b": ["plus"]}}})


def test_derive_from_derived_missing_labels(tmp_path):
    make_npz(tmp_path / "d")
    b = build({"name": "npz", "path": str(tmp_path / "d"), "tasks": ["label"]},
              derive={"nonzero": {"source": "label", "groups": {"no": ["zero"], "yes": ["one", "two"]}}})
    imgs, labels = whole_train(b.groups[0])
    np.testing.assert_array_equal(labels["nonzero"], (imgs[:, 0, 0, 0] % 3 != 0).astype(int))


def test_derive_unknown_source_task(tmp_path):
    with pytest.raises(ConfigError, match=r"data.derive.r.source: no task 'shapes'"):
        build(SHAPES, derive={"r": {"source": "shapes", "groups": {"a": ["circle"], "b": ["plus"]}}})


def test_task_overrides(tmp_path):
    b = build(SHAPES, tasks={"position": {"enabled": False}, "shape": {"label_smoothing": 0.1}})
    assert [t.name for t in b.tasks] == ["shape", "colour", "size"]
    assert set(b.groups[0].train.labels) == set(b.groups[0].test.labels) == {"shape", "colour", "size"}
    assert b.groups[0].flip is True  # position (not flip-invariant) is disabled
    assert (b.task("shape").label_smoothing, b.task("colour").label_smoothing) == (0.1, 0.0)
    assert build(SHAPES).groups[0].flip is False

    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['colours'\]"):
        build(SHAPES, tasks={"colours": {"label_smoothing": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown task\(s\) \['colr'\]"):  # a typo, even when disabled
        build(SHAPES, tasks={"colr": {"enabled": False}})
    derive = {"round": {"source": "shape", "groups": {"yes": ["circle"], "no": ["square"]}}}
    assert [t.name for t in build(SHAPES, derive=derive, tasks={"round": {"enabled": False}}).tasks] == [
        "shape", "colour", "size", "position"]  # a derived task is known
    with pytest.raises(ConfigError, match=r"data\.derive\.r\.source: no task 'colr'"):
        build(SHAPES, derive={"r": derive["round"] | {"source": "colr"}}, tasks={"colr": {"enabled": False}})
    with pytest.raises(ConfigError, match="every task is disabled"):
        build(SHAPES, tasks={n: {"enabled": False} for n in ("shape", "colour", "size", "position")})


def test_validation_split(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    np.savez(root / "train-00.npz", images=id_images(range(20)), label=(np.arange(20) % 2).astype(np.uint8))
    np.savez(root / "test-00.npz", images=id_images([50, 51]), label=np.array([0, 1], np.uint8))
    source = {"name": "npz", "path": str(root), "tasks": ["label"]}

    def ids(b):
        s = b.groups[0]
        return set(s.train.images[:, 0, 0, 0].tolist()), set(s.val.images[:, 0, 0, 0].tolist())

    train, val = ids(build(source, val_fraction=0.25, seed=1))
    assert len(val) == 5 and len(train) == 15
    assert not train & val and train | val == set(range(20))
    assert ids(build(source, val_fraction=0.25, seed=1)) == (train, val)  # same seed, same split
    assert ids(build(source, val_fraction=0.25, seed=2))[1] != val
    b = build(source, val_fraction=0.25, seed=1)
    np.testing.assert_array_equal(b.groups[0].val.labels["label"], b.groups[0].val.images[:, 0, 0, 0] % 2)

    lim = build(source, val_fraction=0.25, seed=1, limit_train=4, limit_test=1)
    assert (len(lim.groups[0].train), len(lim.groups[0].val), len(lim.groups[0].test)) == (4, 5, 1)
    assert set(lim.groups[0].train.images[:, 0, 0, 0].tolist()) <= train
    with pytest.raises(ConfigError, match="val_fraction"):
        build(source, val_fraction=1.0)


def test_decoded_cache_reuse_and_invalidation(tmp_path, monkeypatch):
    root = tmp_path / "d"
    make_npz(root)
    shard = root / "train-00.npz"
    t0 = 1_700_000_000 * 10**9
    os.utime(shard, ns=(t0, t0 + 100_000_000))
    cache = tmp_path / "mycache"
    source = {"name": "npz", "path": str(root), "tasks": ["label"]}

    first = build(source, cache_dir=str(cache))
    assert len(cache_entries(cache)) == 1 and cache_entries(cache)[0].startswith("npz-")
    assert not (tmp_path / "cache").exists()  # data.cache_dir wins over $MTLVISION_CACHE

    def no_load(self):
        raise AssertionError("source decoded again although the cache holds it")

    with monkeypatch.context() as m:
        m.setattr(NpzSource, "load", no_load)
        second = build(source, cache_dir=str(cache))
    assert isinstance(second.groups[0].test.images, np.memmap)
    for split in ("train", "val", "test"):
        a, b = getattr(first.groups[0], split), getattr(second.groups[0], split)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels["label"], b.labels["label"])
    assert len(cache_entries(cache)) == 1

    # rewrite a shard: same size, same whole-second mtime, different labels -> a new entry
    z = dict(np.load(shard))
    z["label"] = ((z["label"] + 1) % 3).astype(np.uint8)
    size = shard.stat().st_size
    np.savez(shard, **z)
    assert shard.stat().st_size == size
    os.utime(shard, ns=(t0, t0 + 600_000_000))
    third = build(source, cache_dir=str(cache))
    assert len(cache_entries(cache)) == 2
    imgs, labels = whole_train(third.groups[0])
    ids = imgs[:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(labels["label"], np.where(ids < 6, ids + 1, ids) % 3)  # ids 0..5 rewritten

    # another source option -> another entry; the default root is $MTLVISION_CACHE
    build(source | {"tasks": {"digit": {"key": "label"}}})
    assert len(cache_entries(tmp_path / "cache")) == 1


def test_cache_rebuilds_broken_entry(tmp_path):
    make_npz(tmp_path / "d")
    source = {"name": "npz", "path": str(tmp_path / "d"), "tasks": ["label"]}
    first = build(source)
    (name,) = cache_entries(tmp_path / "cache")
    entry = tmp_path / "cache" / name
    for damage in ("train_images.npy", "test_labels.npz", "meta.json"):
        if damage == "train_images.npy":
            (entry / damage).unlink()
        else:
            (entry / damage).write_bytes(b"garbage")
        again = build(source)
        np.testing.assert_array_equal(again.groups[0].test.images, first.groups[0].test.images)
        np.testing.assert_array_equal(again.groups[0].train.labels["label"], first.groups[0].train.labels["label"])
        assert cache_entries(tmp_path / "cache") == [entry.name] and (entry / "train_images.npy").is_file()


def test_cache_disabled(tmp_path, monkeypatch):
    make_npz(tmp_path / "d")
    calls = []
    original = NpzSource.load
    monkeypatch.setattr(NpzSource, "load", lambda self: calls.append(1) or original(self))
    for _ in range(2):
        b = build({"name": "npz", "path": str(tmp_path / "d"), "tasks": ["label"]}, cache=False)
        assert not isinstance(b.groups[0].test.images, np.memmap)
    assert len(calls) == 2 and not (tmp_path / "cache").exists()


def test_shapes_deterministic(tmp_path):
    a, b = build(SHAPES, seed=4), build(SHAPES, seed=4)
    for split in ("train", "val", "test"):
        sa, sb = getattr(a.groups[0], split), getattr(b.groups[0], split)
        np.testing.assert_array_equal(sa.images, sb.images)
        for k in sa.labels:
            np.testing.assert_array_equal(sa.labels[k], sb.labels[k])
    assert a.mean == b.mean and a.std == b.std
    assert (len(a.groups[0].train), len(a.groups[0].val), len(a.groups[0].test)) == (54, 6, 20)
    other = build(SHAPES | {"seed": 5}, seed=4)
    assert not np.array_equal(other.groups[0].test.images, a.groups[0].test.images)
    assert not (tmp_path / "cache").exists()  # shapes is generated, never cached


def test_multi_input_streams(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    np.savez(root / "train-00.npz", images=id_images(range(10), size=8), digit=(np.arange(10) % 2).astype(np.uint8))
    np.savez(root / "test-00.npz", images=id_images([1, 2], size=8), digit=np.array([1, 0], np.uint8))
    npz = {"name": "npz", "path": str(root), "tasks": ["digit"]}
    b = build(sources={"shapes": SHAPES, "digits": npz}, val_fraction=0.2)
    assert len(b.groups) == 2 and [s.name for s in b.groups] == ["shapes", "digits"]
    assert b.tasks[-1].name == "digit"
    assert b.groups[1].tasks == ["digit"] and len(b.groups[1].val) == 2

    with pytest.raises(ConfigError, match="different image shapes"):
        build(sources={"shapes": SHAPES | {"size": 16}, "digits": npz})
    clash = r"data\.sources\.b: task name\(s\) \['colour', 'position', 'shape', 'size'\] already"
    with pytest.raises(ConfigError, match=clash):
        build(sources={"a": SHAPES, "b": SHAPES})


def test_unknown_source_and_params(tmp_path):
    with pytest.raises(ConfigError, match="unknown data source 'imagenet'.*valid: .*imagefolder"):
        build({"name": "imagenet"})
    with pytest.raises(ConfigError, match=re.escape("data.source: unknown key(s) pth")):
        build({"name": "imagefolder", "pth": "x"})
