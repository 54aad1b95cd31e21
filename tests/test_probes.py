"""The trainer's probe (training/probes.py): extra keyed batches, validation batches, shifted parameters."""
from __future__ import annotations

import copy

import torch

from mtlvision.config import load_config
from mtlvision.training import build_trainer

from conftest import tiny_config


def _trainer(tmp_path, **over):
    return build_trainer(load_config(data=tiny_config(**over)), tmp_path / "run", quiet=True)


def _losses(tr, x, labels, rows, model=None):
    out = (model or tr.model)(x)
    return {t.name: t.loss(out.logits[t.name][rows[t.name]], labels[t.name]) for t in tr.tasks}


def test_extra_batches_are_keyed_and_the_model_is_left_as_it_was(tmp_path):
    tr = _trainer(tmp_path)
    tr.model.train()
    x, labels, rows = tr.next_batch(0, 0)
    state = copy.deepcopy(tr.model.state_dict())
    probe = tr.prober.for_step(x, labels, rows, 0, 0)
    own = probe("train", 0)
    torch.manual_seed(0)  # the same dropout draws (none here) as a plain forward
    expect = _losses(tr, x, labels, rows, copy.deepcopy(tr.model))
    for name, value in own.losses.items():
        torch.testing.assert_close(value, expect[name])
    one, again, two = probe("train", 1), probe("train", 1), probe("train", 2)
    for name in one.losses:
        assert torch.equal(one.losses[name], again.losses[name])  # keyed: the same extra batch every time
    assert any(not torch.equal(one.losses[n], two.losses[n]) for n in one.losses)
    assert any(not torch.equal(one.losses[n], own.losses[n]) for n in one.losses)
    val = probe("val", 0)
    assert all(torch.isfinite(v) for v in val.losses.values()) and val.ctx.probe is None
    after = tr.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # parameters and BatchNorm statistics untouched


def test_shifted_parameters_are_differentiable_and_not_applied(tmp_path):
    tr = _trainer(tmp_path)
    tr.model.eval()  # no BatchNorm batch statistics: the shifted forward is comparable to a moved copy
    x, labels, rows = tr.next_batch(0, 0)
    probe = tr.prober.for_step(x, labels, rows, 0, 0)
    head = tr.parts.task_params[-1]
    delta = torch.full_like(head, 0.01, requires_grad=True)
    shifted = probe("train", 0, shift={head: delta})
    moved = copy.deepcopy(tr.model)
    with torch.no_grad():
        dict(moved.named_parameters())[next(n for n, p in tr.model.named_parameters() if p is head)].add_(0.01)
    expect = _losses(tr, x, labels, rows, moved)
    for name, value in shifted.losses.items():
        torch.testing.assert_close(value, expect[name])
    total = sum(shifted.losses.values())
    (g_delta,) = torch.autograd.grad(total, [delta], retain_graph=True)
    (g_head,) = torch.autograd.grad(total, [head])
    torch.testing.assert_close(g_delta, g_head)  # d/dδ L(θ + δ) = d/dθ L(θ + δ)
    assert head.grad is None  # autograd.grad never writes .grad
