"""Task-features' per-task Jacobian in closed form (`ModelOutput.task_jacobian`, used by `FeatureSpace.jacobian`
through `StepContext.task_jacobian`): the same rows as one autograd call per task, offered only at a split cut,
and every feature-space method's step unchanged with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mtlvision.balancing import StepContext, build_balancer
from mtlvision.balancing.spaces import SPACES, per_task_rows
from mtlvision.config import ModelConfig, load_config
from mtlvision.models import build_model
from mtlvision.models.architectures.task_features import SharingJacobian
from mtlvision.tasks import Task
from mtlvision.training import build_trainer

from conftest import tiny_config

TASKS = [Task("a", ["0", "1", "2"]), Task("b", ["x", "y"]), Task("c", ["p", "q", "r", "s"]), Task("d", ["u", "v"]),
         Task("e", ["0", "1", "2"])]
HEADS = {"linear": "linear", "mlp": {"name": "mlp", "hidden": 12}}  # dropout-free (the mlp default)
CASES = [(s, h) for s in ("attention", "gate") for h in HEADS]
METHODS = ["pcgrad", "mgda", "upgrad", "imtl_g", "nash_mtl", "graddrop", "gradnorm", "cagrad"]


def _model(sharing="attention", head="linear", dtype=torch.float32, seed=0):
    """A small task-features model whose sharing module matters: W_o and beta away from their zero start."""
    torch.manual_seed(seed)
    arch = {"name": "task-features", "feature_dim": 8, "sharing": sharing}
    model = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 4, "out_dim": 16}, architecture=arch,
                                    head=HEADS[head]), TASKS, (16, 16, 3)).to(dtype)
    with torch.no_grad():
        model.out.weight.normal_(0, 0.5)
        model.beta.normal_()
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.3)
    return model


def _losses(out, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [F.cross_entropy(out.logits[t.name], torch.randint(0, t.num_classes, (n,), generator=g)) for t in TASKS]


def _x(dtype=torch.float32, n=6):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)


def _rows(losses, out):
    return per_task_rows(losses, list(out.shared), lambda grads: grads[0].reshape(-1))


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("sharing,head", CASES)
def test_closed_form_equals_per_task_autograd(sharing, head):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        model = _model(sharing, head, dtype)
        out = model(_x(dtype), split=True)
        losses = _losses(out)
        expect = _rows(losses, out)
        got = out.task_jacobian(losses)
        assert got.shape == expect.shape == (len(TASKS), 6 * 16) and got.dtype == dtype
        assert _rel(got, expect) < tol, (dtype, _rel(got, expect))
        # objectives that are functions of their own task's loss (DB-MTL's log, weights): still exact
        transformed = [torch.log(o + 0.1) * (i + 1) for i, o in enumerate(losses)]
        assert _rel(out.task_jacobian(transformed), _rows(transformed, out)) < tol
        assert all(p.grad is None for p in model.parameters())  # the rows touch no .grad


def test_rows_in_chunks_of_the_batch(monkeypatch):
    """The (B, T, T, d) products run over chunks of rows: 4 + 2 rows here, as one chunk of all 6."""
    model = _model("attention", "mlp")
    out = model(_x(), split=True)
    losses = _losses(out)
    whole = out.task_jacobian(losses)
    monkeypatch.setattr(SharingJacobian, "chunk", 4 * len(TASKS) ** 2 * 8)
    assert _rel(out.task_jacobian(losses), whole) < 1e-6  # float rounding of other matrix-product blocks
    monkeypatch.setattr(SharingJacobian, "chunk", 1)  # below one row: one row at a time
    assert _rel(out.task_jacobian(losses), whole) < 1e-6


def test_offered_only_at_a_split_cut():
    model, x = _model(), _x()
    assert model(x).task_jacobian is None
    with torch.no_grad():
        assert model(x, split=True).task_jacobian is None
    assert model(x, split=True).task_jacobian is not None
    hps = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 4, "out_dim": 16},
                                  architecture={"name": "hps"}), TASKS, (16, 16, 3))
    assert hps(x, split=True).task_jacobian is None  # no closed form: one autograd call per task


def test_constant_objectives_give_zero_rows_and_the_count_is_checked():
    model = _model()
    out = model(_x(), split=True)
    losses = _losses(out)
    losses[2] = torch.tensor(1.5)
    J = out.task_jacobian(losses)
    assert J[2].abs().max() == 0
    torch.testing.assert_close(J, _rows(losses, out), rtol=1e-5, atol=1e-7)
    assert out.task_jacobian([torch.tensor(1.0)] * len(TASKS)).abs().max() == 0
    with pytest.raises(ValueError, match="one objective per task"):
        out.task_jacobian(losses[:-1])


def test_shifted_parameters_of_a_functional_call_are_the_ones_differentiated():
    """Probes run the model through functional_call with θ + δ: the closed form must use those weights, not the
    module's own (restored when the call returns)."""
    model = _model()
    g = torch.Generator().manual_seed(5)
    state = {n: p + 0.3 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
    out = functional_call(model, state, (_x(),), {"split": True})
    losses = _losses(out)
    assert _rel(out.task_jacobian(losses), _rows(losses, out)) < 1e-5


def test_feature_space_takes_the_rows_from_the_context():
    model = _model()
    out = model(_x(), split=True)
    losses = _losses(out)
    calls = []

    def closed_form(objectives):
        calls.append(len(objectives))
        return out.task_jacobian(objectives)

    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=out.trunk,
                      task_jacobian=closed_form)
    jac = SPACES["feature"].jacobian(losses, ctx)
    assert calls == [len(TASKS)]
    assert _rel(jac.matrix, _rows(losses, out)) < 1e-5


def _step(method, sharing, head, closed):
    """One step of `method` in feature space; every parameter's gradient (model and method)."""
    model = _model(sharing, head)
    torch.manual_seed(0)  # methods whose seed defaults to the torch seed
    spec = {"method": method, **({} if method == "graddrop" else {"space": "feature"})}
    balancer = build_balancer(spec, TASKS)
    out = model(_x(), split=True)
    losses = dict(zip([t.name for t in TASKS], _losses(out)))
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=out.trunk,
                      task_jacobian=out.task_jacobian if closed else None)
    weights = balancer.backward(losses, ctx)
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *balancer.named_parameters()]
             if p.grad is not None}
    return weights, grads


@pytest.mark.parametrize("sharing,head", [("attention", "linear"), ("gate", "mlp")])
@pytest.mark.parametrize("method", METHODS)
def test_feature_space_methods_step_alike_with_the_closed_form(method, sharing, head):
    w_ref, ref = _step(method, sharing, head, closed=False)
    w_got, got = _step(method, sharing, head, closed=True)
    assert w_got == pytest.approx(w_ref, rel=1e-4, abs=1e-6)
    assert got.keys() == ref.keys() and any(n.startswith("backbone.") for n in got)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5 * float(ref[name].abs().max()) + 1e-8,
                                   msg=lambda m, name=name: f"{method} {name}: {m}")


def test_trainer_and_probe_contexts_carry_the_closed_form(tmp_path, monkeypatch):
    cfg = tiny_config(data__source__n_train=40, data__source__n_test=20, data__batch_size=8, train__threads=1,
                      train__device="cpu")
    cfg["balancing"] = {"method": "pcgrad", "space": "feature"}
    tr = build_trainer(load_config(data=cfg), tmp_path, quiet=True)
    calls, closed_form = [], SharingJacobian.__call__
    monkeypatch.setattr(SharingJacobian, "__call__", lambda self, o: calls.append(len(o)) or closed_form(self, o))
    tr.train_step(0, 0)
    assert calls == [len(tr.tasks)]  # the step's rows came from the closed form
    batch = tr.next_batch(0, 1)
    shift = {p: torch.full_like(p, 0.05) for p in tr.model.parameters()}
    probe = tr.prober.for_step(batch.x, batch.labels, batch.rows, 0, 1)("train", 0, shift)
    losses = [probe.losses[t.name] for t in tr.tasks]
    assert probe.ctx.task_jacobian is not None
    assert _rel(probe.ctx.task_jacobian(losses), _rows(losses, probe.ctx)) < 1e-5


def test_objectives_of_another_forward_are_refused():
    model = _model()
    first, second = model(_x(), split=True), model(_x(), split=True)
    with pytest.raises(ValueError, match="do not depend on the heads' inputs"):
        first.task_jacobian(_losses(second))


def test_not_offered_by_a_compiled_forward():
    """Compiled, u is an output of one fused autograd node, off the logits' path: rows from it would be zero."""
    model = _model()
    torch._dynamo.reset()
    out = torch.compile(model)(_x(), split=True)
    assert out.task_jacobian is None
    assert out.shared[0].requires_grad and not out.shared[0].grad_fn  # still split: per-task autograd rows
