"""Sharded streaming format: writer, reader (ranks x workers, per-epoch order), `shards` source and CLI."""
from __future__ import annotations

import collections
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mtlvision.cli import main
from mtlvision.config import load_config
from mtlvision.data import SOURCES
from mtlvision.data.cache import cache_key
from mtlvision.data.shards import ShardReader, write_shards
from mtlvision.errors import DataError
from mtlvision.tasks import MISSING
from mtlvision.training import train

from conftest import tiny_config

CLASSES = ["bird", "cat", "dog"]
N_TRAIN, N_TEST = 7, 3  # per class: 21 training images, 9 test images


def make_folder(root: Path) -> dict[str, bytes]:
    """root/{train,test}/<class>/<file>: train PNGs whose red value is a unique id (3 * id + 1, class = id % 3),
    test JPEGs. Returns every file's bytes by path."""
    files = {}
    for split, n, ext in (("train", N_TRAIN, "png"), ("test", N_TEST, "jpg")):
        for ci, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for j in range(n):
                ident = 3 * j + ci
                a = np.zeros((8, 8, 3), np.uint8)
                a[..., 0], a[..., 1] = 3 * ident + 1, np.arange(64).reshape(8, 8) * 4
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG" if ext == "png" else "JPEG", quality=90)
                f = root / split / c / f"{j:02d}.{ext}"
                f.write_bytes(buf.getvalue())
                files[str(f)] = buf.getvalue()
    return files


def source(name: str, **spec):
    return SOURCES.build(SOURCES.spec({"name": name, **spec}, "data.source"))


def tar_samples(path: Path) -> list[tuple[str, str, bytes, dict]]:
    """(key, extension, image bytes, json) of every sample of one shard, read with plain tarfile."""
    with tarfile.open(path) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    keys = sorted({n.split(".", 1)[0] for n in members})
    out = []
    for k in keys:
        (img_name,) = [n for n in members if n.startswith(k + ".") and not n.endswith(".json")]
        out.append((k, img_name.split(".", 1)[1], members[img_name], json.loads(members[k + ".json"])))
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    files = make_folder(root / "imgs")
    index = write_shards(source("imagefolder", path=str(root / "imgs")), root / "out", shard_size=4, seed=3)
    return root / "out", files, index


def ids(images: torch.Tensor) -> list[int]:
    return [(int(v) - 1) // 3 for v in images[:, 0, 0, 0]]


def epoch_stream(out: Path, rank: int, world: int, worker: int, workers: int, epoch: int, **kw):
    r = ShardReader(out, "train", batch_size=3, rank=rank, world_size=world, shuffle_buffer=5, **kw)
    r.set_epoch(epoch)
    return list(r.worker_batches(worker, workers))


def test_index_and_shards_keep_bytes_and_labels(written):
    out, files, index = written
    assert index["format"] == "mtlvision-shards" and index["version"] == 1
    assert index["tasks"][0]["name"] == "class" and index["tasks"][0]["classes"] == CLASSES
    train = index["splits"]["train"]
    assert train["samples"] == 21 and [s["samples"] for s in train["shards"]] == [4, 4, 4, 4, 4, 1]
    assert [s["file"] for s in train["shards"]] == [f"train-{i:05d}.tar" for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json"] + [s["file"] for v in index["splits"].values() for s in v["shards"]])
    seen = {}
    for split in ("train", "test"):
        for s in index["splits"][split]["shards"]:
            assert (out / s["file"]).stat().st_size == s["bytes"]
            for key, ext, data, meta in tar_samples(out / s["file"]):
                assert key.startswith(f"{split}-") and ext == ("png" if split == "train" else "jpg")
                assert data == files[meta["source"]]  # byte for byte: never re-encoded
                assert meta["labels"] == {"class": CLASSES.index(Path(meta["source"]).parent.name)}
                seen[meta["source"]] = key
    assert sorted(seen) == sorted(files)  # every file once
    # seeded shuffle across shards: the first shard already mixes classes
    first = [m["labels"]["class"] for *_, m in tar_samples(out / "train-00000.tar")]
    assert len(set(first)) > 1


def test_every_sample_once_per_epoch_across_ranks_and_workers(written):
    out, _, _ = written
    for epoch in (0, 1):
        got = []
        for rank in (0, 1):
            for worker in (0, 1):
                for images, labels in epoch_stream(out, rank, 2, worker, 2, epoch):
                    assert images.dtype == torch.uint8 and images.shape[1:] == (8, 8, 3)
                    assert labels["class"].dtype == torch.int64
                    assert labels["class"].tolist() == [i % 3 for i in ids(images)]
                    got += ids(images)
        assert sorted(got) == list(range(21)), epoch
    # channels_first and resizing
    images, _ = epoch_stream(out, 0, 1, 0, 1, 0, channels_first=True, image_size=4)[0]
    assert images.shape == (3, 3, 4, 4)


def test_drop_uneven_gives_equal_steps(written):
    out, _, _ = written
    for epoch in range(3):
        steps, got = [], []
        for rank in (0, 1):
            r = ShardReader(out, "train", batch_size=3, rank=rank, world_size=2, drop_uneven=True)
            r.set_epoch(epoch)
            batches = [b for w in (0, 1) for b in r.worker_batches(w, 2)]
            assert len(batches) == r.num_batches(2)
            steps.append(len(batches))
            got += [i for x, _ in batches for i in ids(x)]
        assert steps[0] == steps[1]
        assert len(got) == len(set(got)) and 21 - len(got) <= 3  # at most (shard size - 1) dropped


def test_order_is_seeded_per_epoch(written):
    out, _, _ = written

    def order(epoch: int, seed: int = 0) -> list[int]:
        return [i for x, _ in epoch_stream(out, 1, 2, 0, 2, epoch, seed=seed) for i in ids(x)]

    assert order(0) == order(0) and order(1) == order(1)
    assert order(0) != order(1)
    assert order(0) != order(0, seed=1)
    unshuffled = ShardReader(out, "train", batch_size=100, shuffle=False)
    assert [ids(x) for x, _ in unshuffled] == [ids(x) for x, _ in unshuffled]  # stored order


def test_too_few_shards_for_readers(written):
    out, _, _ = written
    r = ShardReader(out, "train", rank=1, world_size=2)
    with pytest.raises(DataError, match=r"6 shard\(s\), fewer than 2 rank\(s\) x 4 worker\(s\) = 8"):
        list(r.worker_batches(0, 4))
    with pytest.raises(DataError, match="rank 2 of world size 2"):
        ShardReader(out, "train", rank=2, world_size=2)
    with pytest.raises(DataError, match=r"no 'val' split"):
        ShardReader(out, "val")


def test_dataloader_workers(written):
    out, _, _ = written
    r = ShardReader(out, "train", batch_size=4)
    r.set_epoch(2)
    loader = torch.utils.data.DataLoader(r, batch_size=None, num_workers=2)
    got = [i for x, _ in loader for i in ids(x)]
    assert sorted(got) == list(range(21))
    simulated = [i for w in (0, 1) for x, _ in r.worker_batches(w, 2) for i in ids(x)]
    assert sorted(simulated) == sorted(got)


def test_missing_index_means_incomplete(tmp_path, written):
    out, _, _ = written
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.glob("*.tar"):
        (copy / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="incomplete shards: no index.json"):
        ShardReader(copy, "train")
    # a shard cut short after the index was written
    (copy / "index.json").write_bytes((out / "index.json").read_bytes())
    with open(copy / "train-00002.tar", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(DataError, match=r"train-00002\.tar is 1000 bytes, but index\.json says"):
        ShardReader(copy, "train")


def test_crash_mid_write_leaves_no_index(tmp_path):
    make_folder(tmp_path / "imgs")
    lines = ["image,class"] + [f"train/{c}/{j:02d}.png,{c}" for c in CLASSES for j in range(N_TRAIN)]
    lines.insert(15, "train/cat/nope.png,cat")  # a missing file: the writer fails part-way through
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "test.csv").write_text("image,class\ntest/cat/00.jpg,cat\n")
    src = source("csv", images=str(tmp_path / "imgs"), csv=str(tmp_path / "train.csv"),
                 test_csv=str(tmp_path / "test.csv"), tasks=["class"])
    with pytest.raises(DataError, match=r"train\.csv line 16: image file .*nope\.png does not exist"):
        write_shards(src, tmp_path / "out", shard_size=2)
    assert list((tmp_path / "out").glob("train-*.tar")) and not (tmp_path / "out" / "index.json").exists()
    with pytest.raises(DataError, match="incomplete shards"):
        ShardReader(tmp_path / "out", "train")
    with pytest.raises(DataError, match="folder is not empty"):
        write_shards(src, tmp_path / "out")
    # --overwrite replaces the partial output; a corrupt file is named, or skipped with skip_corrupt
    lines[15] = "train/cat/bad.png,cat"
    (tmp_path / "imgs" / "train" / "cat" / "bad.png").write_bytes(b"not an image")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.png \(train\.csv line 16\): cannot decode image"):
        write_shards(src, tmp_path / "out", overwrite=True)
    skipping = source("csv", images=str(tmp_path / "imgs"), csv=str(tmp_path / "train.csv"),
                      test_csv=str(tmp_path / "test.csv"), tasks=["class"], skip_corrupt=True)
    index = write_shards(skipping, tmp_path / "out", overwrite=True)
    assert index["splits"]["train"]["samples"] == 21 and len(index["skipped"]) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["index.json", "test-00000.tar", "train-00000.tar"]
    # from a config, --skip-corrupt applies on top of data.source
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": {
        "name": "csv", "images": str(tmp_path / "imgs"), "csv": str(tmp_path / "train.csv"),
        "test_csv": str(tmp_path / "test.csv"), "tasks": ["class"]}}}))
    assert main(["shards", "--config", str(cfg), str(tmp_path / "out2")]) == 2
    assert main(["shards", "--config", str(cfg), str(tmp_path / "out2"), "--skip-corrupt", "--overwrite"]) == 0
    assert len(json.loads((tmp_path / "out2" / "index.json").read_text())["skipped"]) == 1


def test_csv_missing_labels_and_val_split(tmp_path):
    make_folder(tmp_path / "imgs")
    rows = ["image,split,class,big"]
    for c in CLASSES:
        for j in range(N_TRAIN):
            split = "test" if j == 0 else "val" if j == 1 else "train"
            big = "yes" if j % 2 else "" if j == 4 else "no"
            rows.append(f"train/{c}/{j:02d}.png,{split},{'' if j == 2 else c},{big}")
    (tmp_path / "all.csv").write_text("\n".join(rows) + "\n")
    src = source("csv", images=str(tmp_path / "imgs"), csv=str(tmp_path / "all.csv"), split_column="split",
                 tasks=["class", "big"])
    index = write_shards(src, tmp_path / "out", shard_size=4)
    assert {s: v["samples"] for s, v in index["splits"].items()} == {"train": 15, "val": 3, "test": 3}
    assert [t["classes"] for t in index["tasks"]] == [CLASSES, ["no", "yes"]]
    assert sorted(i for x, _ in ShardReader(tmp_path / "out", "val") for i in ids(x)) == [3, 4, 5]
    got = {}
    for x, y in ShardReader(tmp_path / "out", "train", batch_size=64, shuffle=False):
        for i, c, b in zip(ids(x), y["class"].tolist(), y["big"].tolist()):
            got[i] = (c, b)
    assert len(got) == 15
    for i, (c, b) in got.items():
        j = i // 3
        assert c == (MISSING if j == 2 else i % 3) and b == (1 if j % 2 else MISSING if j == 4 else 0)


def test_shards_source_trains_and_fingerprints(tmp_path, written):
    out, _, _ = written
    cfg = tiny_config(data__source={"name": "shards", "path": str(out)}, data__image_size=16, data__batch_size=8,
                      train__epochs=1, train__log_every=1)
    summary = train(load_config(data=cfg), tmp_path / "run", quiet=True)
    assert summary["tasks"]["class"]["classes"] == CLASSES
    assert 0 <= summary["tasks"]["class"]["test"]["accuracy"] <= 1
    # the cache key covers the index and every shard
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    src = source("shards", path=str(copy))
    names = {Path(f[0]).name for f in src.fingerprint()["files"]}
    assert names == {p.name for p in out.iterdir()}
    key = cache_key("shards", src, 16, None)
    t = time.time() + 5
    os.utime(copy / "train-00003.tar", (t, t))
    assert cache_key("shards", src, 16, None) != key
    only_test = tmp_path / "test_only"
    write_shards(source("imagefolder", path=str(out.parent / "imgs")), only_test, splits=["test"])
    with pytest.raises(DataError, match="no train split"):
        source("shards", path=str(only_test)).load()


def test_cli_shards(tmp_path, written, capsys):
    out, _, _ = written
    imgs = out.parent / "imgs"
    assert main(["shards", str(imgs), str(tmp_path / "a"), "--shard-size", "5", "--task", "animal"]) == 0
    assert "train 21 samples in 5 shard(s), test 9 samples in 2 shard(s)" in capsys.readouterr().out
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["tasks"][0]["name"] == "animal"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"source": {"name": "imagefolder", "path": "elsewhere"}}}))
    assert main(["shards", "--config", str(cfg), "--set", f"data.source.path={imgs}", str(tmp_path / "b"),
                 "--split", "test", "--max-shard-mb", "0.01"]) == 0
    index = json.loads((tmp_path / "b" / "index.json").read_text())
    assert list(index["splits"]) == ["test"] and len(index["splits"]["test"]["shards"]) > 1
    assert all(s["bytes"] <= 0.01 * 2**20 for s in index["splits"]["test"]["shards"])
    capsys.readouterr()
    assert main(["shards", str(tmp_path / "c")]) == 2
    assert "give SRC" in capsys.readouterr().err
    assert main(["shards", str(imgs), str(tmp_path / "a")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["shards", "--config", str(cfg), str(tmp_path / "d"), "--task", "animal", "--image-column", "f"]) == 2
    assert "--task, --image-column describe SRC; with --config" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit) as e:
        main(["shards", "--help"])
    assert e.value.code == 0 and "usage: mtlvision shards" in capsys.readouterr().out


@pytest.mark.slow
def test_cifar10_test_split_round_trip(shared_data, tmp_path):
    start = time.perf_counter()
    index = write_shards(source("imagefolder", path=str(shared_data / "cifar10")), tmp_path / "c10",
                         splits=["test"], shard_size=500)
    assert index["splits"]["test"]["samples"] == 10000 and len(index["splits"]["test"]["shards"]) == 20
    with tarfile.open(shared_data / "cifar10" / "test.tar.gz") as tf:
        originals = {m.name: tf.extractfile(m).read() for m in tf if m.isfile() and m.name.endswith(".jpg")}
    for key, ext, data, meta in tar_samples(tmp_path / "c10" / "test-00007.tar"):
        member = meta["source"].split(":", 1)[1]
        assert ext == "jpg" and data == originals[member]
        assert meta["labels"]["class"] == index["tasks"][0]["classes"].index(member.split("/")[1])
    counts, total = collections.Counter(), 0
    for rank in (0, 1):
        r = ShardReader(tmp_path / "c10", "test", batch_size=256, rank=rank, world_size=2)
        for worker in (0, 1):
            for x, y in r.worker_batches(worker, 2):
                assert x.shape[1:] == (32, 32, 3)
                counts.update(y["class"].tolist())
                total += len(x)
    assert total == 10000 and sorted(counts.items()) == [(c, 1000) for c in range(10)]
    assert time.perf_counter() - start < 120
