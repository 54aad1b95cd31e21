"""Every architecture in multi-input mode: tasks from two datasets share one model, each step one batch per
dataset, with a loss-weighting and two feature-space gradient methods (which split the graph at the
architecture's shared tensors, here over rows that belong to different tasks)."""
import json

import numpy as np
import pytest
import torch

from mtlvision.config import load_config
from mtlvision.models import ARCHITECTURES
from mtlvision.training import build_trainer

from conftest import tiny_config

SMALL_ARCH = {"mmoe": {"experts": 2}, "cgc": {"shared_experts": 1}, "ple": {"shared_experts": 1},
              "dselect-k": {"experts": 2, "k": 1}, "task-features": {"feature_dim": 8}}


@pytest.fixture(scope="module")
def bars(tmp_path_factory):
    """A second dataset, grey 16 px: the class is which third of the image is bright."""
    root = tmp_path_factory.mktemp("bars")
    rng = np.random.default_rng(0)
    for split, n in (("train", 192), ("test", 48)):
        labels = rng.integers(0, 3, n)
        images = rng.integers(0, 60, (n, 16, 16, 1), dtype=np.uint8)
        for i, y in enumerate(labels):
            images[i, :, 5 * y:5 * y + 5] = 255
        np.savez(root / f"{split}-00.npz", images=images, label=labels)
    return root


@pytest.mark.parametrize("method", ["equal", "pcgrad", "mgda"])
@pytest.mark.parametrize("arch", ARCHITECTURES.names())
def test_every_architecture_trains_multi_input(arch, method, bars, tmp_path):
    cfg = tiny_config(model__architecture={"name": arch, **SMALL_ARCH.get(arch, {})},
                      model__backbone={"name": "smallcnn", "width": 4, "out_dim": 16},
                      balancing={"method": method}, train__epochs=3, train__threads=1)
    cfg["data"] = {"sources": {"shapes": {"name": "shapes", "n_train": 240, "n_test": 48, "size": 16},
                               "bars": {"name": "npz", "path": str(bars), "tasks": {"bars": {"key": "label"}}}},
                   "image_size": 16, "channels": 3, "batch_size": 16}
    threads = torch.get_num_threads()
    try:
        trainer = build_trainer(load_config(data=cfg), tmp_path / "run", quiet=True)
        losses, logits, _, _, n = trainer.train_step(0, 0)
        assert n == 32 and len(logits["bars"]) == 16 and len(logits["shape"]) == 16  # one batch per dataset
        summary = trainer.fit()
    finally:
        torch.set_num_threads(threads)
    assert summary["architecture"] == arch
    assert set(summary["tasks"]) == {"shape", "colour", "size", "position", "bars"}
    epochs = [json.loads(line)["train"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shapes_loss = [sum(e[t]["loss"] for t in ("shape", "colour", "size", "position")) for e in epochs]
    bars_loss = [e["bars"]["loss"] for e in epochs]
    # both datasets' tasks learn through the shared model, whatever the architecture shares
    assert shapes_loss[-1] < shapes_loss[0], f"{arch} + {method}: shapes loss {shapes_loss}"
    assert bars_loss[-1] < bars_loss[0], f"{arch} + {method}: bars loss {bars_loss}"
