"""The gradient-balancing machinery (feature and parameter space) and every registered method end to end."""
import json

import pytest
import torch

from mtlvision.balancing import METHODS, StepContext, build_balancer
from mtlvision.balancing.gradient import GradientParams, GramianWeighting, TaskGradients
from mtlvision.config import ModelConfig, load_config
from mtlvision.models import build_model
from mtlvision.tasks import Task
from mtlvision.training import train

from conftest import tiny_config
from probing import model_probe

TASKS = [Task("a", ["0", "1", "2"]), Task("b", ["x", "y"]), Task("c", ["p", "q", "r", "s"])]


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone={"name": "smallcnn", "width": 4, "out_dim": 16},
                                   architecture={"name": "task-features", "feature_dim": 8}), TASKS, (16, 16, 3))


def _batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = {t.name: torch.randint(0, t.num_classes, (n,), generator=g) for t in TASKS}
    return x, y


def _step(model, balancer, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0)
    weights = balancer.backward(losses, ctx)
    return losses, weights, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


class _Ones(GramianWeighting):
    def weights(self, G, ctx):
        return torch.ones(len(G), dtype=G.dtype)


@pytest.mark.parametrize("space", ["feature", "parameter"])
def test_unit_weights_equal_the_summed_loss_backward(space):
    """Feature- or parameter-space EW is exactly the plain backward of sum_t L_t."""
    x, y = _batch()
    ref_model, model = _model(), _model()
    _, _, ref = _step(ref_model, build_balancer({"method": "equal"}, TASKS), x, y)
    _, w, got = _step(model, _Ones(GradientParams(space=space), TASKS), x, y)
    assert w == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5)


def test_feature_space_mgda_matches_its_definition():
    x, y = _batch(1)
    model = _model(1)
    out = model(x)
    losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
    J = torch.stack([torch.autograd.grad(losses[t.name], out.shared, retain_graph=True)[0].reshape(-1)
                     for t in TASKS])
    from mtlvision.balancing.methods.mgda import mgda

    w_ref = mgda(J @ J.T)
    balancer = build_balancer({"method": "mgda"}, TASKS)
    _, w, _ = _step(model, balancer, x, y)
    torch.testing.assert_close(torch.tensor(list(w.values())), w_ref.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(balancer.gramian, J @ J.T, atol=1e-6, rtol=1e-4)
    assert abs(sum(w.values()) - 1) < 1e-5


def test_parameter_space_update_is_w_transpose_jacobian():
    x, y = _batch(2)
    model = _model(2)
    balancer = build_balancer({"method": "imtl_g", "space": "parameter"}, TASKS)
    out = model(x)
    losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
    shared = model.shared_parameters()
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t.name], shared,
                                                                           retain_graph=True)]) for t in TASKS])
    _, w, grads = _step(model, balancer, x, y)
    expect = torch.tensor(list(w.values())) @ J
    got = torch.cat([p.grad.reshape(-1) for p in model.shared_parameters()])
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-4)
    proj = (J @ expect) / J.norm(dim=1)  # IMTL-G: equal projections on unit task gradients
    torch.testing.assert_close(proj, proj.mean().expand(3), atol=1e-4, rtol=1e-3)


def test_all_reduce_hook_sees_the_gramian():
    x, y = _batch(3)
    model = _model(3)
    seen = []
    balancer = build_balancer({"method": "mgda"}, TASKS)
    out = model(x)
    losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0,
                      all_reduce=lambda g: seen.append(g.shape) or g * 2)
    balancer.backward(losses, ctx)
    assert seen == [torch.Size([3, 3])]


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_the_trunk(method):
    """Each method moves the shared (trunk) parameters and lowers the loss: none freezes the encoder."""
    x, y = _batch(4, n=32)
    model = _model(4)
    balancer = build_balancer({"method": method}, TASKS)
    opt = torch.optim.SGD(list(model.parameters()) + list(balancer.parameters()), lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in model.shared_parameters()]
    first = None
    for step in range(25):
        model.zero_grad(set_to_none=True)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
        total = sum(v.item() for v in losses.values())
        first = total if first is None else first
        probe = model_probe(model, x, y, TASKS) if balancer.needs_probe else None
        w = balancer.backward(losses, StepContext(out.shared, model.shared_parameters(),
                                                  model.task_parameters(), step, 0, probe=probe))
        assert all(torch.isfinite(torch.tensor(v)) for v in w.values())
        opt.step()
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(model.shared_parameters(), before))
    assert moved > 0, f"{method} left the trunk untouched"
    assert total < first, f"{method}: loss {first:.3f} -> {total:.3f}"


def test_gradient_telemetry_reaches_metrics_log(tmp_path):
    summary = train(load_config(data=tiny_config(train__epochs=1, balancing={"method": "pcgrad"})),
                    tmp_path / "pc", quiet=True)
    line = json.loads((tmp_path / "pc" / "metrics.jsonl").read_text().splitlines()[0])
    tele = line["balancing"]
    assert set(tele["weight"]) == set(summary["tasks"])
    assert set(tele["norm"]) == set(summary["tasks"]) and all(v > 0 for v in tele["norm"].values())
    assert "shape|colour" in tele["cosine"] and all(-1 <= v <= 1 for v in tele["cosine"].values())


def _combine(method, J, ctx, losses=None):
    """One `combine` on a given Jacobian, its state committed as `backward` would: (update, weights)."""
    losses = torch.ones(len(J), dtype=torch.float64) if losses is None else losses
    result = method.combine(TaskGradients(J, J @ J.T, losses), ctx)
    method.commit(result.state)
    return result.update, result.weights


def test_graddrop_keeps_one_sign_per_unit():
    """With leak 0, every unit of the combined gradient comes from tasks whose batch signal shares one sign."""
    from mtlvision.balancing.methods.graddrop import GradDrop, GradDropParams

    T, B, D = 3, 4, 50
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(B, D, generator=g).abs()  # positive activations: sign(A) = 1
    grads = torch.randn(T, B, D, generator=g)
    ctx = StepContext(shared, [], [], 0, 0)
    gd = GradDrop(GradDropParams(), TASKS)
    update, kept = _combine(gd, grads.reshape(T, -1), ctx)
    update = update.view(B, D)
    signal = grads.sum(1)  # (T, D)
    for d in range(D):
        positive = signal[:, d] > 0
        expect_pos = grads[positive, :, d].sum(0)
        expect_neg = grads[~positive, :, d].sum(0)
        assert torch.allclose(update[:, d], expect_pos) or torch.allclose(update[:, d], expect_neg)
    assert ((kept >= 0) & (kept <= 1)).all()
    full = _combine(GradDrop(GradDropParams(leak=1.0), TASKS), grads.reshape(T, -1), ctx)[0]
    torch.testing.assert_close(full, grads.sum(0).reshape(-1))  # leak 1: plain sum


def test_gradnorm_weight_gradient_follows_the_paper():
    from mtlvision.balancing.methods.gradnorm import GradNorm, GradNormParams

    gn = GradNorm(GradNormParams(alpha=1.0), TASKS)
    gn.initial.copy_(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    losses = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)  # training rates L/L0: 0.5, 1, 0.5
    J = torch.diag(torch.tensor([2.0, 1.0, 1.0]))  # G = diag(4, 1, 1): gradient norms 2, 1, 1
    result = gn.combine(TaskGradients(J, J @ J.T, losses), None)
    w = result.weights
    assert torch.equal(w, torch.ones(3))
    assert torch.equal(result.task_scale, w) and torch.equal(result.update, w @ J)
    scaled = torch.tensor([2.0, 1.0, 1.0])
    ratio = torch.tensor([0.5, 1.0, 0.5]) / (2 / 3)
    target = scaled.mean() * ratio
    assert gn.w.grad is None  # the weight gradient is returned, not written, by `combine`
    gn.write_grads(result.own_grads)
    torch.testing.assert_close(gn.w.grad, torch.sign(scaled - target) * torch.tensor([2.0, 1.0, 1.0]))


def test_db_mtl_scales_ema_gradients_to_the_largest_norm():
    from mtlvision.balancing.methods.db_mtl import DBMTL, DBMTLParams

    db = DBMTL(DBMTLParams(beta=0.5), TASKS)
    J1 = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    J2 = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
    ctx = StepContext(torch.zeros(1), [], [], 0, 0)
    _combine(db, J1, ctx)
    d, w = _combine(db, J2, ctx)
    avg = 0.5 * (0.5 * J1) + 0.5 * J2  # first step: 0.5*0 + 0.5*J1; second: 0.5*avg + 0.5*J2
    norms = avg.norm(dim=1)
    torch.testing.assert_close(w, norms.max() / norms)
    torch.testing.assert_close(d, (w[:, None] * avg).sum(0))
    assert torch.allclose((w[:, None] * avg).norm(dim=1), norms.max().expand(3))
    resumed = DBMTL(DBMTLParams(beta=0.5), TASKS)
    resumed.load_state_dict(db.state_dict())  # the lazily sized average survives a checkpoint
    torch.testing.assert_close(resumed.average, db.average)
    assert int(resumed.steps) == 2
