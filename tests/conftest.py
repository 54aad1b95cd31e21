"""Shared fixtures: a private decoded-image cache, tiny configs, and the shared real-data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(os.environ.get("MTLVISION_DATA", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))

THREADS = min(2, os.cpu_count() or 1)
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _thread_count():
    """Every test starts with THREADS threads: a config with `train.threads` (also in a module-scoped
    fixture, set up before this one) changes the whole process's count, and float results depend on it."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MTLVISION_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set MTLVISION_DATA)")
    return SHARED_DATA.resolve()


def tiny_config(**over) -> dict:
    """A seconds-long shapes run: smallcnn width 8, 600 training images."""
    cfg = {
        "name": "tiny",
        "data": {"source": {"name": "shapes", "n_train": 600, "n_test": 200}, "batch_size": 64},
        "model": {"backbone": {"name": "smallcnn", "width": 8, "out_dim": 32},
                  "architecture": {"name": "task-features", "feature_dim": 16}},
        "train": {"epochs": 2, "lr": 0.05, "log_every": 5},
    }
    for key, value in over.items():
        node = cfg
        *path, last = key.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return cfg
