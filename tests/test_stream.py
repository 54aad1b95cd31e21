"""Streaming the training split from shards: StreamLoader coverage, ranks, determinism, resume, config errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mtlvision.config import load_config
from mtlvision.data import SOURCES, build_data
from mtlvision.data.shards import write_shards
from mtlvision.data.stream import StreamLoader
from mtlvision.errors import ConfigError, DataError
from mtlvision.training import train

from conftest import tiny_config

N_TRAIN, N_VAL, N_TEST = 48, 9, 9
CPU = torch.device("cpu")


def write_images(root: Path) -> Path:
    """16x16 PNGs whose red value is a unique id; class = id % 3 (also in the blue channel); a CSV with a
    split column (train, val, test). Returns the CSV."""
    (root / "imgs").mkdir(parents=True)
    rows = ["image,split,class"]
    for i in range(N_TRAIN + N_VAL + N_TEST):
        split = "train" if i < N_TRAIN else "val" if i < N_TRAIN + N_VAL else "test"
        a = np.zeros((16, 16, 3), np.uint8)
        a[..., 0], a[..., 1], a[..., 2] = i, np.arange(16)[:, None] * 8, 100 * (i % 3)
        Image.fromarray(a).save(root / "imgs" / f"{i}.png")
        rows.append(f"{i}.png,{split},{'abc'[i % 3]}")
    (root / "all.csv").write_text("\n".join(rows) + "\n")
    return root / "all.csv"


def csv_source(root: Path, **spec):
    spec = {"images": str(root / "imgs"), "csv": str(root / "all.csv"), "tasks": ["class"], **spec}
    return SOURCES.build(SOURCES.spec({"name": "csv", **spec}, "data.source"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, Path]:
    """even: 48 training samples in 12 shards of 4; uneven: in shards of 5 (9 x 5 + 3); noval: train + test."""
    root = tmp_path_factory.mktemp("stream")
    write_images(root)
    out = {}
    for name, size in (("even", 4), ("uneven", 5)):
        write_shards(csv_source(root, split_column="split"), root / name, shard_size=size, seed=1)
        out[name] = root / name
    lines = (root / "all.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join(["image,class"] + [",".join(x.split(",")[::2]) for x in lines[1:]
                                                                 if ",test," in x]) + "\n")
    (root / "train.csv").write_text("\n".join(["image,class"] + [",".join(x.split(",")[::2]) for x in lines[1:]
                                                                  if ",test," not in x]) + "\n")
    write_shards(csv_source(root, csv=str(root / "train.csv"), test_csv=str(root / "test.csv")), root / "noval",
                 shard_size=6, seed=1)
    out["noval"] = root / "noval"
    return out


def stream_config(path: Path, **over) -> dict:
    source = {"name": "shards", "path": str(path), "stream": True, **over.pop("source", {})}
    return tiny_config(data__source=source, data__batch_size=4, train__log_every=1, train__threads=1, **over)


def loader(path: Path, rank: int = 0, world: int = 1, workers: int = 0, epochs: int = 2, **source) -> StreamLoader:
    data = build_data(load_config(data=stream_config(path, source={"workers": workers, **source})))
    return StreamLoader(data.groups[0].streamed, 4, 0, 0, None, rank, world, CPU, epochs)


def epoch_ids(ld: StreamLoader, epoch: int) -> list[list[int]]:
    """The ids (red value) of each batch of one epoch, checking every label against its id."""
    out = []
    for step in range(ld.natural_steps):
        x, y = ld.batch(epoch, step, ld.natural_steps)
        assert x.shape == (4, 16, 16, 3) and x.dtype == torch.uint8
        ids = x[:, 0, 0, 0].tolist()
        assert y["class"].tolist() == [i % 3 for i in ids]
        out.append(ids)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_epoch_covers_each_sample_once(shards, workers):
    ld = loader(shards["even"], workers=workers)
    assert ld.natural_steps == 12
    orders = []
    for epoch in (0, 1):
        ids = [i for b in epoch_ids(ld, epoch) for i in b]
        assert sorted(ids) == list(range(N_TRAIN)), epoch  # divisible: exactly once
        orders.append(ids)
    assert orders[0] != orders[1]
    assert [i for b in epoch_ids(ld, 0) for i in b] == orders[0]  # an epoch restarts identically
    # not divisible (shards of 5, 3; batches re-formed across the 2 workers): at most once, fixed batch size
    ld = loader(shards["uneven"], workers=workers)
    assert ld.natural_steps == N_TRAIN // 4
    for epoch in (0, 1):
        ids = [i for b in epoch_ids(ld, epoch) for i in b]
        assert len(ids) == len(set(ids)) == 4 * ld.natural_steps and set(ids) <= set(range(N_TRAIN))


def test_ranks_take_disjoint_samples_and_equal_steps(shards):
    for path, exact in ((shards["even"], True), (shards["uneven"], False)):
        loaders = [loader(path, rank=r, world=2, workers=2, epochs=3) for r in (0, 1)]
        assert loaders[0].natural_steps == loaders[1].natural_steps > 0
        for epoch in range(3):
            per_rank = [[i for b in epoch_ids(ld, epoch) for i in b] for ld in loaders]
            assert not set(per_rank[0]) & set(per_rank[1])
            ids = per_rank[0] + per_rank[1]
            assert len(ids) == len(set(ids))
            if exact:
                assert sorted(ids) == list(range(N_TRAIN))


def test_access_is_sequential(shards):
    ld = loader(shards["even"])
    with pytest.raises(DataError, match="stream is not started"):
        ld.batch(0, 3, ld.natural_steps)
    ld.batch(0, 0, ld.natural_steps)
    with pytest.raises(DataError, match="asked for epoch 1 step 3, but the stream is at epoch 1 step 2"):
        ld.batch(0, 2, ld.natural_steps)
    with pytest.raises(DataError, match="cannot cycle"):
        ld.batch(0, 1, 2 * ld.natural_steps)
    ld.batch(0, 1, ld.natural_steps)
    ld.batch(1, 0, ld.natural_steps)  # a new epoch may start at any time
    ld.close()


def test_resize_and_channels_match_the_cache(shards):
    """data.image_size / data.channels: streamed images are exactly what the in-memory path decodes."""
    spec = {"data__image_size": 8, "data__channels": 1}
    data = build_data(load_config(data=stream_config(shards["even"], **spec)))
    assert data.image_shape == (8, 8, 1) and len(data.mean) == 1
    ld = StreamLoader(data.groups[0].streamed, 4, 0, 0, None)
    streamed = [x.tobytes() for step in range(12) for x in ld.batch(0, step, 12)[0].numpy()]
    memory = build_data(load_config(data=stream_config(shards["even"], source={"stream": False}, **spec)))
    assert sorted(streamed) == sorted(x.tobytes() for x in memory.groups[0].train.images)
    assert np.allclose(data.mean, memory.mean) and np.allclose(data.std, memory.std)


def test_val_shards_hold_out_whole_training_shards(shards):
    index = json.loads((shards["noval"] / "index.json").read_text())
    train = index["splits"]["train"]["shards"]
    held = sum(s["samples"] for s in train[-2:])
    data = build_data(load_config(data=stream_config(shards["noval"], source={"val_shards": 2})))
    s = data.groups[0]
    assert len(s.val) == held and s.streamed.samples == N_TRAIN + N_VAL - held
    val_ids = set(s.val.images[:, 0, 0, 0].tolist())
    ld = StreamLoader(s.streamed, 4, 0, 0, None, 0, 1, CPU, 1)
    ids = [i for b in epoch_ids(ld, 0) for i in b]
    assert not val_ids & set(ids) and len(set(ids)) == len(ids) == 4 * ld.natural_steps


def test_streamed_training_is_deterministic(shards, tmp_path):
    derive = {"is_a": {"source": "class", "groups": {"a": ["a"], "bc": ["b", "c"]}}}
    results = {}
    for workers in (0, 2):
        cfg = stream_config(shards["uneven"], source={"workers": workers}, data__derive=derive, train__epochs=1)
        runs = [train(load_config(data=cfg), tmp_path / f"w{workers}-{k}", quiet=True) for k in (0, 1)]
        assert runs[0]["tasks"] == runs[1]["tasks"]
        assert set(runs[0]["tasks"]) == {"class", "is_a"}
        results[workers] = runs[0]
    ckpt = torch.load(tmp_path / "w0-0" / "checkpoint.pt", weights_only=True)
    data = build_data(load_config(data=stream_config(shards["uneven"])))
    assert ckpt["input"]["mean"] == data.mean and ckpt["input"]["image_shape"] == [16, 16, 3]
    # the statistics sample is the streamed split's first samples (all 48 here), not the val split
    train_mean = np.mean([[i / 255, r * 8 / 255, 100 * (i % 3) / 255] for i in range(N_TRAIN) for r in range(16)], 0)
    assert np.allclose(data.mean, train_mean)
    lines = [json.loads(x) for x in (tmp_path / "w2-0" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == N_TRAIN // 4
    with pytest.raises(DataError, match="training split is streamed .* use the val or test split"):
        data.groups[0].split("train")


def test_streamed_resume_after_kill_matches_uninterrupted_run(shards, tmp_path):
    """SIGKILL a streamed CLI run (2 workers) in the middle of epoch 2, resume it, compare with a straight run."""
    cfg = stream_config(shards["even"], source={"workers": 2}, train__epochs=3)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    straight = train(load_config(cfg_path), tmp_path / "straight", quiet=True)
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtlvision", "train", str(cfg_path), "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    killed = False
    for line in proc.stdout:
        if line.startswith("epoch 2/3 step 5/"):  # epoch 1 is checkpointed; epoch 2 is under way
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=60)
    assert killed and proc.returncode == -signal.SIGKILL
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0
    resumed = subprocess.run([sys.executable, "-m", "mtlvision", "train", "--resume", str(run), "--quiet"],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    final = json.loads((run / "summary.json").read_text())
    assert final["tasks"] == straight["tasks"] and final["best_epoch"] == straight["best_epoch"]
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_config_errors(shards):
    def build(path: Path, **over):
        return build_data(load_config(data=stream_config(path, **over)))

    with pytest.raises(ConfigError, match=r"data\.source\.workers: expected >= 0, got -1"):
        build(shards["even"], source={"workers": -1})
    with pytest.raises(ConfigError, match=r"data\.source\.shuffle_buffer: expected >= 1"):
        build(shards["even"], source={"shuffle_buffer": 0})
    with pytest.raises(ConfigError, match=r"data\.source\.workers: only used with data\.source\.stream: true"):
        build(shards["even"], source={"stream": False, "workers": 2})
    with pytest.raises(DataError, match=r"stream: true needs a validation split.*--split all.*val_shards: K"):
        build(shards["noval"])
    with pytest.raises(ConfigError, match="has its own val split; remove val_shards"):
        build(shards["even"], source={"val_shards": 1})
    with pytest.raises(DataError, match="val_shards: 10 of the 10 training shard"):
        build(shards["noval"], source={"val_shards": 10})
    with pytest.raises(ConfigError, match=r"data\.limit_train: not available with data\.source\.stream: true"):
        build(shards["even"], data__limit_train=10)
    with pytest.raises(ConfigError, match=r"data\.sources\.a\.stream: a streamed training split needs a single"):
        build_data(load_config(data={"data": {"sources": {
            "a": {"name": "shards", "path": str(shards["even"]), "stream": True}}}}))
    with pytest.raises(DataError, match="fewer than 2 rank"):
        loader(shards["even"], rank=0, world=2, workers=8)
    with pytest.raises(DataError, match="fewer than data.batch_size 64"):
        StreamLoader(build(shards["even"]).groups[0].streamed, 64, 0, 0, None)


@pytest.mark.slow
def test_cifar10_test_split_streams_one_epoch(shared_data, tmp_path):
    """The CIFAR-10 test JPEGs as shards, 16 shards relabelled train, 2 val and 2 test; one streamed epoch."""
    start = time.perf_counter()
    out = tmp_path / "c10"
    src = SOURCES.build(SOURCES.spec({"name": "imagefolder", "path": str(shared_data / "cifar10")}, "data.source"))
    index = write_shards(src, out, splits=["test"], shard_size=500)
    files = index["splits"]["test"]["shards"]
    splits = {}
    for i, s in enumerate(files):
        split = "train" if i < 16 else "val" if i < 18 else "test"
        name = f"{split}-{len(splits.get(split, [])):05d}.tar"
        (out / s["file"]).rename(out / f".{name}")
        splits.setdefault(split, []).append({**s, "file": name})
    for shard_list in splits.values():
        for s in shard_list:
            (out / f".{s['file']}").rename(out / s["file"])
    index["splits"] = {k: {"samples": sum(s["samples"] for s in v), "shards": v} for k, v in splits.items()}
    (out / "index.json").write_text(json.dumps(index))
    cfg = tiny_config(data__source={"name": "shards", "path": str(out), "stream": True, "workers": 2},
                      data__batch_size=128, train__epochs=1, train__log_every=10, train__threads=1)
    summary = train(load_config(data=cfg), tmp_path / "run", quiet=True)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 8000 // 128
    assert summary["tasks"]["class"]["test"]["count"] == 1000
    assert summary["tasks"]["class"]["test"]["accuracy"] > 0.15  # chance: 0.1
    assert time.perf_counter() - start < 180
