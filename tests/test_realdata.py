"""Real datasets from ../shared/data: loading, labels and a short training run on each (marked slow)."""
import json
from pathlib import Path

import numpy as np
import pytest

from mtlvision.config import load_config
from mtlvision.data import build_data
from mtlvision.training import train

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_cifar10_imagefolder_tars_with_aux_task(shared_data, tmp_path):
    cfg = load_config(CONFIGS / "cifar10_aux.yaml", overrides=[f"data.source.path={shared_data}/cifar10"])
    data = build_data(cfg)
    s = data.groups[0]
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    assert s.train.images.shape[1:] == (32, 32, 3) and s.flip
    assert data.task("class").classes[0] == "airplane"
    cls, veh = s.test.labels["class"], s.test.labels["vehicle"]
    assert np.bincount(cls).tolist() == [1000] * 10
    vehicles = {data.task("class").classes.index(c) for c in ("airplane", "automobile", "ship", "truck")}
    assert np.array_equal(veh == 1, np.isin(cls, list(vehicles)))
    assert 0.4 < data.mean[0] < 0.55  # strided sample over all classes, not only airplanes


def test_cifar10_short_training(shared_data, tmp_path):
    cfg = load_config(CONFIGS / "cifar10_aux.yaml", overrides=[
        f"data.source.path={shared_data}/cifar10", "data.limit_train=3000", "data.limit_test=1000",
        "train.epochs=2", "model.backbone.width=0.125"])
    summary = train(cfg, tmp_path / "c10", quiet=True)
    assert summary["tasks"]["vehicle"]["test"]["accuracy"] > 0.7
    assert summary["tasks"]["class"]["test"]["accuracy"] > 0.2


def test_multimnist_build_and_train(shared_data, tmp_path):
    cfg = load_config(CONFIGS / "multimnist.yaml", overrides=[
        f"data.source.path={shared_data}/mnist", "data.limit_train=4000", "data.limit_test=1000",
        "train.epochs=2", "model.backbone.width=16"])
    data = build_data(cfg)
    s = data.groups[0]
    assert s.test.images.shape[1:] == (28, 28, 1) and not s.flip
    assert len(s.test) == 1000
    summary = train(cfg, tmp_path / "mm", quiet=True)
    assert summary["tasks"]["left"]["test"]["accuracy"] > 0.7
    assert summary["tasks"]["right"]["test"]["accuracy"] > 0.6


def test_utkface_folds_and_missing_labels(shared_data, tmp_path):
    cfg = load_config(CONFIGS / "utkface.yaml", overrides=[
        f"data.source.path={shared_data}/utkface_crop_part1", "baselines.single_task=false",
        "train.epochs=1", "model.backbone.width=0.125", "data.limit_train=1500"])
    data = build_data(cfg)
    s = data.groups[0]
    meta = np.concatenate([np.load(f)["fold"] for f in sorted((shared_data / "utkface_crop_part1").glob("all-*.npz"))])
    files = sorted((shared_data / "utkface_crop_part1").glob("all-*.npz"))
    dup = np.concatenate([np.load(f)["is_duplicate"] for f in files])
    assert len(s.test) == int(((meta == 0) & ~dup).sum())
    assert (s.test.labels["gender"] == -1).sum() >= 0 and (s.train.labels["gender"] >= -1).all()
    assert data.task("age_group").classes[-1] == "60+"
    assert set(np.unique(s.test.labels["age_group"])) <= set(range(7))
    summary = train(cfg, tmp_path / "utk", quiet=True)
    assert summary["tasks"]["gender"]["test"]["count"] <= len(s.test)
    assert "balanced_accuracy" in summary["tasks"]["gender"]["test"]


def test_omniglot_and_fashion_mnist_configs_build(shared_data):
    om = build_data(load_config(CONFIGS / "omniglot.yaml", overrides=[f"data.source.path={shared_data}/omniglot"]))
    s = om.groups[0]
    assert s.train.images.shape[1:] == (32, 32, 1)
    assert len(s.train) + len(s.val) + len(s.test) == 19280
    fm = build_data(load_config(CONFIGS / "fashion_mnist.yaml",
                                overrides=[f"data.source.path={shared_data}/fashion_mnist"]))
    assert fm.task("kind").classes == ["top", "bottom", "footwear", "other"]
    assert (fm.groups[0].test.labels["kind"] >= 0).all()


def test_multi_input_cifar10_fashion_mnist(shared_data, tmp_path):
    cfg = load_config(CONFIGS / "multi_input_cifar10_fmnist.yaml", overrides=[
        f"data.sources.cifar.path={shared_data}/cifar10", f"data.sources.fashion.path={shared_data}/fashion_mnist",
        "data.limit_train=2000", "data.limit_test=500", "train.epochs=2", "model.backbone.width=0.125"])
    summary = train(cfg, tmp_path / "mi", quiet=True)
    assert set(summary["tasks"]) == {"cifar10", "fashion"}
    assert summary["tasks"]["fashion"]["test"]["count"] == 500
    assert summary["tasks"]["fashion"]["test"]["accuracy"] > 0.3  # chance: 0.1
    lines = [json.loads(x) for x in (tmp_path / "mi" / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[0]["train"]) == {"cifar10", "fashion"}
