"""Many tasks: the feature-space per-task gradients in one pass (`spaces.feature_rows`) against T separate
autograd calls, on every architecture and on graphs built to stress the task-private / mixed split."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlvision.balancing import StepContext
from mtlvision.balancing import spaces
from mtlvision.balancing.spaces import SPACES, feature_rows
from mtlvision.config import ModelConfig
from mtlvision.models import ARCHITECTURES, build_model
from mtlvision.tasks import Task

F64 = torch.float64
TASKS = [Task("a", ["0", "1", "2"]), Task("b", ["x", "y"]), Task("c", ["p", "q", "r", "s"]), Task("d", ["u", "v"])]
BACKBONE = {"name": "smallcnn", "width": 4, "out_dim": 16}
ARCHS = ([{"name": n} for n in ARCHITECTURES.names()]
         + [{"name": "task-features", "sharing": "gate"}, {"name": "dselect-k", "entropy_reg": 0.1},
            {"name": "ple", "levels": 1}, {"name": "mtan", "reduction": 2}, {"name": "cross-stitch", "mixing": "stage"}])


def loop_rows(objectives, shared):
    """The reference: one autograd.grad per objective."""
    out = []
    for o in objectives:
        gs = torch.autograd.grad(o, shared, retain_graph=True, allow_unused=True)
        out.append([g if g is not None else torch.zeros_like(s) for g, s in zip(gs, shared)])
    return [torch.stack([r[k] for r in out]) for k in range(len(shared))]


def assert_rows_equal(got, expect, rel=1e-12):
    for g, e in zip(got, expect, strict=True):
        assert g.shape == e.shape
        scale = max(float(e.abs().max()), 1e-300)
        assert float((g - e).abs().max()) <= rel * scale


def arch_losses(arch, train=True):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=BACKBONE, architecture=arch), TASKS, (16, 16, 3)).double()
    model.train(train)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 16, generator=g, dtype=F64)
    out = model(x, split=True)
    losses = [F.cross_entropy(out.logits[t.name], torch.randint(0, t.num_classes, (6,), generator=g))
              for t in TASKS]
    return model, out, losses


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a.values())))
def test_rows_equal_per_task_autograd_on_every_architecture(arch):
    _, out, losses = arch_losses(arch)
    shared = list(out.shared)
    assert_rows_equal(feature_rows(losses, shared), loop_rows(losses, shared))


class Counted(torch.autograd.Function):
    """Identity whose backward counts its calls (one call = one traversal of the region it sits in)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        Counted.calls += 1
        return grad


def toy(T=6, mixed=True, direct=True, seed=0):
    """h (leaf) -> [mixing layer read by every task] -> per-task heads; each head may also read h directly."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(5, 4, generator=g, dtype=F64).requires_grad_()
    W = torch.randn(4, T, 3, generator=g, dtype=F64, requires_grad=True)
    heads = [torch.randn(3 + 4, 2, generator=g, dtype=F64, requires_grad=True) for _ in range(T)]
    m = Counted.apply(torch.tanh(torch.einsum("bi,itk->btk", h, W))) if mixed else None
    m = m.softmax(1) if mixed else None  # every task's features depend on every other's
    losses = []
    for t in range(T):
        parts = [m[:, t] if mixed else torch.zeros(5, 3, dtype=F64), h.sin() if direct else torch.zeros(5, 4, dtype=F64)]
        z = torch.cat(parts, 1) @ heads[t]
        losses.append(F.cross_entropy(z, torch.arange(5) % 2))
    return h, [W, *heads], losses


@pytest.mark.parametrize("mixed,direct", [(True, True), (True, False), (False, True)])
def test_the_mixed_region_is_traversed_once_for_all_tasks(mixed, direct):
    h, _, losses = toy(mixed=mixed, direct=direct)
    expect = loop_rows(losses, [h])
    Counted.calls = 0
    got = feature_rows(losses, [h])
    # the per-task loop traverses it T times; a task that also reads h directly costs one summed traversal
    assert Counted.calls == (0 if not mixed else 2 if direct else 1)
    assert_rows_equal(got, expect)


def test_chunked_batches_give_the_same_rows(monkeypatch):
    h, _, losses = toy(T=7)
    expect = feature_rows(losses, [h])
    monkeypatch.setattr(spaces, "BATCH_BYTES", 1)  # one task per batched backward
    Counted.calls = 0
    got = feature_rows(losses, [h])
    assert Counted.calls == 7 + 1  # one batched backward per task, and the summed one (direct reads)
    assert_rows_equal(got, expect, rel=1e-15)


def test_shared_objectives_constants_and_unused_tensors():
    """The same loss for two tasks (their top node is mixed), a constant objective, a shared tensor no task
    reads, a task reading only one of two shared tensors."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_()
    b = torch.randn(4, 2, generator=g, dtype=F64).requires_grad_()
    unused = torch.randn(4, 5, dtype=F64).requires_grad_()
    la = (a.sin() ** 2).sum()
    lb = (a * b.sum(1, keepdim=True)).exp().mean()
    const = torch.tensor(2.0, dtype=F64)
    objectives = [la, lb, la, const, b.square().sum()]
    shared = [a, b, unused]
    got = feature_rows(objectives, shared)
    expect = loop_rows([o if o.requires_grad else (a * 0).sum() for o in objectives], shared)
    assert_rows_equal(got, expect)
    assert got[2].abs().max() == 0 and got[0][3].abs().max() == 0


def test_task_parameters_receive_the_scaled_sum():
    h, params, losses = toy(T=4)
    scale = torch.tensor([0.5, 2.0, 0.0, 1.5])
    heads = params[1:]
    ctx = StepContext((h,), [], heads, 0, 0)
    jac = SPACES["feature"].jacobian(losses, ctx)
    expect = torch.autograd.grad(sum(s * o for s, o in zip(scale.tolist(), losses)), heads, retain_graph=True)
    SPACES["feature"].apply_task_grads(jac, scale)
    for p, e in zip(heads, expect):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-15)
    assert params[0].grad is None  # not in ctx.task_params
