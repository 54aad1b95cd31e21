"""Fine-tuning controls: backbone LR multiplier and layer-wise decay, a frozen backbone for the first epochs,
frozen BatchNorm statistics, the EMA of the weights, and the pretrained normalisation in the run."""
from __future__ import annotations

import copy

import pytest
import torch

from mtlvision.config import load_config
from mtlvision.errors import ConfigError
from mtlvision.training import build_trainer, train

from conftest import tiny_config


def _cfg(**over):
    return load_config(data=tiny_config(**over))


def test_backbone_lr_and_layer_decay_scale_each_depth(tmp_path):
    tr = build_trainer(_cfg(finetune={"backbone_lr": 0.1, "layer_decay": 0.5}, train__lr=0.2), tmp_path / "r",
                       quiet=True)
    backbone = tr.model.backbone
    depth, top = backbone.layer_ids(), backbone.num_layers - 1
    lr_of = {id(p): g["lr"] for g in tr.optimizer.param_groups for p in g["params"]}
    for name, p in backbone.named_parameters():
        assert lr_of[id(p)] == pytest.approx(0.2 * 0.1 * 0.5 ** (top - depth[name]))
    assert {lr_of[id(p)] for p in tr.model.heads.parameters()} == {0.2}
    assert len({round(v, 12) for v in lr_of.values()}) == len(set(depth.values())) + 1  # each depth + task side
    ratios = {id(p): lr_of[id(p)] / 0.2 for p in tr.model.parameters()}
    for step in range(3):  # the schedule keeps every group's scale
        tr.train_step(0, step)
        base = tr.optimizer.param_groups[0]["lr"] / ratios[id(tr.optimizer.param_groups[0]["params"][0])]
        for g in tr.optimizer.param_groups:
            assert g["lr"] == pytest.approx(base * ratios[id(g["params"][0])])


@pytest.mark.parametrize("balancing", [{"method": "equal"}, {"method": "pcgrad"},
                                       {"method": "mgda", "space": "parameter"}], ids=["equal", "pcgrad", "mgda-param"])
def test_frozen_backbone_then_full_fine_tuning(tmp_path, balancing):
    tr = build_trainer(_cfg(finetune={"freeze_backbone_epochs": 1}, balancing=balancing, train__epochs=2),
                       tmp_path / "f", quiet=True)
    start = copy.deepcopy(tr.model.state_dict())
    tr.train_epoch(0)
    mid = copy.deepcopy(tr.model.state_dict())
    frozen = [k for k in start if k.startswith("backbone.")]
    assert frozen and all(torch.equal(start[k], mid[k]) for k in frozen)  # weights and BatchNorm statistics
    assert any(not torch.equal(start[k], mid[k]) for k in start if not k.startswith("backbone."))
    tr.train_epoch(1)
    assert any(not torch.equal(mid[k], tr.model.state_dict()[k]) for k in frozen if "weight" in k)


def test_frozen_batchnorm_statistics(tmp_path):
    tr = build_trainer(_cfg(finetune={"freeze_bn": True}), tmp_path / "bn", quiet=True)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.train_epoch(0)
    after = tr.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    affine = [k for k in before if k.endswith("bn.weight") or (".1.weight" in k and k.startswith("backbone."))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in affine)


def test_ema_weights_are_evaluated_saved_and_resumed(tmp_path):
    out = tmp_path / "ema"
    summary = train(_cfg(finetune={"ema": 0.9}), out, quiet=True)
    best = torch.load(out / "best.pt", weights_only=True)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    ema = {k[len("module."):]: v for k, v in ckpt["finetune"]["ema"].items() if k.startswith("module.")}
    if best["epoch"] == ckpt["epoch"]:
        assert all(torch.equal(best["model"][k], ema[k]) for k in best["model"])
    assert any(not torch.equal(ckpt["model"][k], ema[k]) for k in ema if "weight" in k)  # not the raw weights
    fresh = build_trainer(_cfg(finetune={"ema": 0.9}), out, resume=True, quiet=True)
    from mtlvision.training.checkpoint import restore
    restore(fresh)
    for k, v in fresh.eval_model.state_dict().items():
        assert torch.equal(v, ema[k])
    assert summary["tasks"]["shape"]["test"]["accuracy"] > 0


def test_fine_tuning_values_are_checked():
    for key, value in (("backbone_lr", -1), ("layer_decay", 1.5), ("freeze_backbone_epochs", -1), ("ema", 1.0)):
        with pytest.raises(ConfigError, match=f"finetune.{key}"):
            _cfg(finetune={key: value})
    with pytest.raises(ConfigError, match=r"finetune.freeze_backbone_epochs: expected at most train.epochs \(2\)"):
        _cfg(finetune={"freeze_backbone_epochs": 3})
