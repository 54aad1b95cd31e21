"""Many tasks: the per-task rows of J are taken with respect to the shared tensors only, and the task-specific
parameters are differentiated once, after the method has combined (`GradientSpace.apply_task_grads`); checked
against per-task autograd on every architecture and in both spaces."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlvision.balancing import StepContext
from mtlvision.balancing.spaces import SPACES
from mtlvision.config import ModelConfig
from mtlvision.models import ARCHITECTURES, build_model
from mtlvision.tasks import Task

F64 = torch.float64
TASKS = [Task("a", ["0", "1", "2"]), Task("b", ["x", "y"]), Task("c", ["p", "q", "r", "s"]), Task("d", ["u", "v"])]
BACKBONE = {"name": "smallcnn", "width": 4, "out_dim": 16}
ARCHS = ([{"name": n} for n in ARCHITECTURES.names()]
         + [{"name": "task-features", "sharing": "gate"}, {"name": "dselect-k", "entropy_reg": 0.1},
            {"name": "ple", "levels": 1}, {"name": "mtan", "reduction": 2},
            {"name": "cross-stitch", "mixing": "stage"}])
SCALE = torch.tensor([0.5, 2.0, 0.0, 1.5], dtype=F64)


def arch_step(arch, space):
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=BACKBONE, architecture=arch), TASKS, (16, 16, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 16, 16, generator=g, dtype=F64)
    out = model(x, split=space == "feature")
    losses = [F.cross_entropy(out.logits[t.name], torch.randint(0, t.num_classes, (6,), generator=g)) for t in TASKS]
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=out.trunk)
    return model, out, losses, ctx


@pytest.mark.parametrize("space", ["feature", "parameter"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a.values())))
def test_rows_and_task_gradients_equal_per_task_autograd(arch, space):
    model, out, losses, ctx = arch_step(arch, space)
    wrt = list(out.shared) if space == "feature" else model.shared_parameters()
    task = model.task_parameters()
    rows = []
    for o in losses:
        grads = torch.autograd.grad(o, wrt, retain_graph=True, allow_unused=True)
        grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, wrt)]
        rows.append(torch.cat([g.reshape(len(g), -1) for g in grads], 1).reshape(-1) if space == "feature"
                    else torch.cat([g.reshape(-1) for g in grads]))
    expect_rows = torch.stack(rows)
    expect_task = torch.autograd.grad(sum(s * o for s, o in zip(SCALE.tolist(), losses)), task, retain_graph=True,
                                      allow_unused=True)
    jac = SPACES[space].jacobian(losses, ctx)
    torch.testing.assert_close(jac.matrix, expect_rows.to(jac.matrix.dtype), rtol=1e-6, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # the rows touch no .grad
    SPACES[space].apply_task_grads(jac, SCALE)
    for p, e in zip(task, expect_task):
        if e is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    assert all(p.grad is None for p in model.shared_parameters())


class Counted(torch.autograd.Function):
    """Identity whose backward counts its calls."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        Counted.calls += 1
        return grad


@pytest.mark.parametrize("space", ["feature", "parameter"])
def test_task_parameters_are_differentiated_once_not_per_task(space):
    """A module every task reads (here a mixing layer with weight W): the per-task rows never back-propagate
    into W; `apply_task_grads` does, once."""
    T = 6
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(4, 4, generator=g, dtype=F64, requires_grad=True)  # the trunk
    x = torch.randn(5, 4, generator=g, dtype=F64)
    trunk = torch.tanh(x @ theta)
    h = trunk.detach().requires_grad_() if space == "feature" else trunk
    W = torch.randn(4, T, 3, generator=g, dtype=F64, requires_grad=True)
    heads = [torch.randn(3, 2, generator=g, dtype=F64, requires_grad=True) for _ in range(T)]
    m = torch.einsum("bi,itk->btk", h, Counted.apply(W)).softmax(1)
    losses = [F.cross_entropy(m[:, t] @ heads[t], torch.arange(5) % 2) for t in range(T)]
    ctx = StepContext((h,), [theta], [W, *heads], 0, 0, trunk=(trunk,))
    expect = torch.autograd.grad(sum(losses), W, retain_graph=True)[0]
    Counted.calls = 0
    jac = SPACES[space].jacobian(losses, ctx)
    assert Counted.calls == 0  # the per-task loop before this change crossed it T times
    SPACES[space].apply_task_grads(jac, None)
    assert Counted.calls == 1
    torch.testing.assert_close(W.grad, expect, rtol=1e-12, atol=1e-14)


def test_constant_objectives_and_unused_shared_tensors():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_()
    unused = torch.randn(4, 5, dtype=F64).requires_grad_()
    head = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    objectives = [(a @ head).sin().sum(), torch.tensor(2.0, dtype=F64), (a ** 2).sum()]
    ctx = StepContext((a, unused), [], [head], 0, 0)
    jac = SPACES["feature"].jacobian(objectives, ctx)
    assert jac.matrix.shape == (3, 4 * 8)
    J = jac.matrix.view(3, 4, 8)
    assert J[1].abs().max() == 0 and J[:, :, 3:].abs().max() == 0
    torch.testing.assert_close(J[2, :, :3], (2 * a).detach().float())
    expect = torch.autograd.grad(objectives[0], head, retain_graph=True)[0]
    SPACES["feature"].apply_task_grads(jac, torch.tensor([1.0, 5.0, 1.0]))
    torch.testing.assert_close(head.grad, expect)
