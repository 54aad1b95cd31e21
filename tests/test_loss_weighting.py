"""Loss-weighting methods (uw, dwa, rlw, gls, imtl_l, famo) against their definitions on tiny problems."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from mtlvision.balancing import METHODS, StepContext, build_balancer
from mtlvision.errors import ConfigError
from mtlvision.tasks import MISSING, Task

TASKS = [Task("a", ["x", "y"]), Task("b", ["p", "q", "r"])]
TASKS3 = TASKS + [Task("c", ["u", "v"])]
NEW_METHODS = ["uw", "dwa", "rlw", "gls", "imtl_l", "famo"]
SPECS = [{"method": "uw"}, {"method": "uw", "regulariser": "log_var"}, {"method": "dwa"},
         {"method": "rlw", "seed": 3}, {"method": "rlw"}, {"method": "gls"}, {"method": "imtl_l"},
         {"method": "famo"}, {"method": "famo", "optimizer": "sgd", "lr": 0.5}]


@pytest.fixture(autouse=True)
def _one_thread():
    """These problems are tiny: a thread pool only adds contention (conftest restores the count)."""
    torch.set_num_threads(1)


def ctx(epoch: int = 0, step: int = 0, **kw) -> StepContext:
    return StepContext(torch.zeros(1), [], [], step, epoch, **kw)


def build(name: str, tasks=TASKS, **params):
    return build_balancer({"method": name, **params}, tasks)


def leaves(*values: float) -> list[torch.Tensor]:
    return [torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for v in values]


def as_losses(ls, tasks=TASKS) -> dict[str, torch.Tensor]:
    return {t.name: v for t, v in zip(tasks, ls)}


def roundtrip(obj):
    """Through torch.save / torch.load(weights_only=True), as the trainer's checkpoints go."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_registered_with_params_and_descriptions():
    for name in NEW_METHODS:
        assert name in METHODS.names()
        assert METHODS.get(name).description
    with pytest.raises(ConfigError, match="unknown key"):
        build("dwa", tau=2.0)
    with pytest.raises(ConfigError):
        build("dwa", temperature=0.0)
    with pytest.raises(ConfigError):
        build("famo", lr=-1.0)
    with pytest.raises(ConfigError):
        build("uw", regulariser="half")
    with pytest.raises(ConfigError, match="takes no parameters"):
        build("gls", x=1)


# -- uw ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("regulariser,scale", [("log_var", 1.0), ("log_sigma", 0.5)])
def test_uw_gradients_match_definition(regulariser, scale):
    b = build("uw", regulariser=regulariser)
    with torch.no_grad():
        b.log_vars.copy_(torch.tensor([0.3, -0.7]))
    s = b.log_vars.detach().double()
    la, lb = leaves(0.5, 2.0)
    w = b.backward(as_losses([la, lb]), ctx())
    L = torch.tensor([0.5, 2.0], dtype=torch.float64)
    # d/ds_t [exp(-s_t) L_t + scale * s_t] = -exp(-s_t) L_t + scale
    torch.testing.assert_close(b.log_vars.grad.double(), -torch.exp(-s) * L + scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.stack([la.grad, lb.grad]), torch.exp(-s), rtol=1e-6, atol=1e-7)
    assert w == pytest.approx({"a": math.exp(-0.3), "b": math.exp(0.7)}, rel=1e-6)


@pytest.mark.parametrize("regulariser,offset", [("log_var", 1.0), ("log_sigma", 2.0)])
def test_uw_log_variances_converge_to_log_loss(regulariser, offset):
    """Optimised alone on constant losses: s_t -> log L_t (log 2 L_t for the eq. 10 form)."""
    b = build("uw", regulariser=regulariser)
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    L = [0.5, 3.0]
    for _ in range(400):
        opt.zero_grad()
        b.backward(as_losses([torch.tensor(v) for v in L]), ctx())
        opt.step()
    expected = torch.log(torch.tensor(L) * offset)
    torch.testing.assert_close(b.log_vars.detach(), expected, atol=1e-4, rtol=0)


def test_uw_zero_loss_leaves_its_log_variance_alone():
    b = build("uw")
    la, lb = leaves(0.0, 2.0)
    w = b.backward(as_losses([la, lb]), ctx())
    # 1/2 - exp(-s) L (eq. 10)
    assert b.log_vars.grad[0].item() == 0.0 and b.log_vars.grad[1].item() == pytest.approx(0.5 - 2.0)
    assert all(math.isfinite(v) for v in w.values())


# -- dwa --------------------------------------------------------------------------------------------

def dwa_expected(ratios, tau):
    e = [math.exp(r / tau) for r in ratios]
    return [len(ratios) * x / sum(e) for x in e]


def test_dwa_first_two_epochs_equal_then_softmax_of_ratios():
    b = build("dwa")
    assert b.backward(as_losses(leaves(1.0, 1.0)), ctx(epoch=0)) == {"a": 1.0, "b": 1.0}
    b.epoch_end(0, {"a": 2.0, "b": 1.0})
    assert b.backward(as_losses(leaves(1.0, 1.0)), ctx(epoch=1)) == {"a": 1.0, "b": 1.0}
    b.epoch_end(1, {"a": 1.0, "b": 1.0})  # r = (1/2, 1/1)
    la, lb = leaves(0.7, 0.9)
    w = b.backward(as_losses([la, lb]), ctx(epoch=2, step=5))
    # hand-computed: 2 e^{0.25} / (e^{0.25} + e^{0.5}) and 2 e^{0.5} / (e^{0.25} + e^{0.5})
    wa = 2 * math.exp(0.25) / (math.exp(0.25) + math.exp(0.5))
    assert w["a"] == pytest.approx(wa, rel=1e-12) and w["b"] == pytest.approx(2 - wa, rel=1e-12)
    assert w["a"] == pytest.approx(2 / (1 + math.exp(0.25))) == pytest.approx(0.875647, abs=1e-6)
    assert (la.grad.item(), lb.grad.item()) == pytest.approx((w["a"], w["b"]), rel=1e-12)


def test_dwa_temperature_and_three_tasks():
    b = build("dwa", tasks=TASKS3, temperature=0.5)
    b.epoch_end(3, {"a": 4.0, "b": 1.0, "c": 2.0})
    b.epoch_end(4, {"a": 2.0, "b": 1.5, "c": 2.0})
    w = b.weights(5)
    assert [w["a"], w["b"], w["c"]] == pytest.approx(dwa_expected([0.5, 1.5, 1.0], 0.5), rel=1e-12)
    assert sum(w.values()) == pytest.approx(3.0)
    assert b.weights(7) == {"a": 1.0, "b": 1.0, "c": 1.0}  # epochs 5 and 6 unknown


def test_dwa_state_round_trip_gives_the_same_weights():
    a = build("dwa")
    for e, ls in enumerate([{"a": 3.0, "b": 2.0}, {"a": 2.0, "b": 1.9}, {"a": 1.5, "b": 1.0}]):
        a.epoch_end(e, ls)
    b = build("dwa")
    b.load_extra_state(roundtrip(a.extra_state()))
    assert b.weights(3) == a.weights(3) and b.weights(3) != {"a": 1.0, "b": 1.0}
    for x in (a, b):
        x.epoch_end(3, {"a": 1.4, "b": 0.5})
    assert b.weights(4) == a.weights(4)
    assert len(a.extra_state()["history"]) == 2  # only what the next epoch needs is kept


def test_dwa_zero_epoch_losses_stay_finite():
    b = build("dwa")
    b.epoch_end(0, {"a": 0.0, "b": 1.0})
    b.epoch_end(1, {"a": 0.5, "b": 0.0})  # r_a = 0.5/0 -> 1 (neutral), r_b = 0
    w = b.weights(2)
    assert all(math.isfinite(v) and v > 0 for v in w.values())
    assert [w["a"], w["b"]] == pytest.approx(dwa_expected([1.0, 0.0], 2.0))


# -- rlw --------------------------------------------------------------------------------------------

def test_rlw_weights_are_a_softmax_reproducible_per_seed_epoch_step():
    b = build("rlw", tasks=TASKS3, seed=11)
    w = b.weights(2, 7)
    assert w.sum().item() == pytest.approx(1.0) and bool((w > 0).all())
    assert torch.equal(w, build("rlw", tasks=TASKS3, seed=11).weights(2, 7))
    assert not torch.equal(w, b.weights(2, 8))
    assert not torch.equal(w, b.weights(3, 7))
    assert not torch.equal(w, build("rlw", tasks=TASKS3, seed=12).weights(2, 7))
    la, lb, lc = leaves(1.0, 2.0, 3.0)
    rng = torch.get_rng_state()
    got = b.backward(as_losses([la, lb, lc], TASKS3), ctx(epoch=2, step=7))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert list(got.values()) == w.tolist()
    assert [la.grad.item(), lb.grad.item(), lc.grad.item()] == pytest.approx(w.tolist(), rel=1e-12)


def test_rlw_draws_are_softmax_of_standard_normal():
    b = build("rlw", seed=0)
    x = torch.stack([b.weights(e, s).log() for e in range(4) for s in range(1000)])
    d = x[:, 0] - x[:, 1]  # log(w_a / w_b) = x_a - x_b ~ N(0, 2)
    assert abs(d.mean().item()) < 0.1 and d.var().item() == pytest.approx(2.0, rel=0.1)


def test_rlw_default_seed_is_the_torch_seed_and_survives_resume():
    torch.manual_seed(123)
    a = build("rlw")
    assert a.seed == 123
    torch.manual_seed(7)
    b = build("rlw")
    assert not torch.equal(a.weights(0, 0), b.weights(0, 0))
    b.load_extra_state(roundtrip(a.extra_state()))
    assert torch.equal(a.weights(5, 3), b.weights(5, 3))


# -- gls --------------------------------------------------------------------------------------------

def test_gls_gradient_is_the_geometric_mean_gradient():
    b = build("gls", tasks=TASKS3)
    vals = (0.5, 2.0, 4.0)
    ls = leaves(*vals)
    w = b.backward(as_losses(ls, TASKS3), ctx())
    ref = leaves(*vals)
    (ref[0] * ref[1] * ref[2]).pow(1 / 3).backward()
    for got, want in zip(ls, ref):
        assert got.grad.item() == pytest.approx(want.grad.item(), rel=1e-12)
    g = 4.0 ** (1 / 3)  # geometric mean of 0.5, 2, 4
    assert list(w.values()) == pytest.approx([g / (3 * v) for v in vals], rel=1e-12)
    assert list(w.values()) == pytest.approx([r.grad.item() for r in ref], rel=1e-12)


def test_gls_zero_loss_task_is_left_out_of_the_product():
    b = build("gls", tasks=TASKS3)
    ls = leaves(0.0, 2.0, 8.0)
    w = b.backward(as_losses(ls, TASKS3), ctx())
    g = 4.0  # sqrt(2 * 8): geometric mean of the present tasks
    assert w == pytest.approx({"a": 0.0, "b": g / (2 * 2.0), "c": g / (2 * 8.0)}, rel=1e-12)
    assert ls[0].grad.item() == 0.0 and ls[1].grad.item() == pytest.approx(1.0)
    ls = leaves(0.0, 0.0, 0.0)
    w = b.backward(as_losses(ls, TASKS3), ctx())
    assert all(v == 0.0 for v in w.values()) and all(x.grad.item() == 0.0 for x in ls)


# -- imtl_l -----------------------------------------------------------------------------------------

def test_imtl_l_gradient_and_optimum():
    b = build("imtl_l")
    with torch.no_grad():
        b.log_scales.copy_(torch.tensor([0.2, -1.0]))
    la, lb = leaves(0.5, 3.0)
    w = b.backward(as_losses([la, lb]), ctx())
    s = torch.tensor([0.2, -1.0], dtype=torch.float64)
    L = torch.tensor([0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(b.log_scales.grad.double(), torch.exp(s) * L - 1, rtol=1e-6, atol=1e-6)
    assert [la.grad.item(), lb.grad.item()] == pytest.approx(torch.exp(s).tolist(), rel=1e-6)
    assert list(w.values()) == pytest.approx(torch.exp(s).tolist(), rel=1e-6)
    # optimised alone, the scaled losses exp(s_t) L_t reach 1
    b = build("imtl_l")
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        b.backward(as_losses([torch.tensor(0.5), torch.tensor(3.0)]), ctx())
        opt.step()
    torch.testing.assert_close(torch.exp(b.log_scales.detach()) * torch.tensor([0.5, 3.0]),
                               torch.ones(2), atol=1e-4, rtol=0)


def test_imtl_l_zero_loss_leaves_its_scale_alone():
    b = build("imtl_l")
    b.backward(as_losses(leaves(0.0, 2.0)), ctx())
    assert b.log_scales.grad.tolist() == [0.0, pytest.approx(1.0)]


# -- famo -------------------------------------------------------------------------------------------

SCRIPT = [(1.0, 2.0, 0.5), (0.8, 1.9, 0.45), (0.7, 1.5, 0.44), (0.65, 1.45, 0.3), (0.5, 1.4, 0.29),
          (0.45, 1.0, 0.28), (0.3, 0.99, 0.2)]


class FamoReference:
    """The update as the paper's Algorithm 1 ("sgd") / the official code ("adam") write it, with
    the 'after' losses of step t taken from step t+1."""

    def __init__(self, n, lr, gamma, optimizer):
        self.w = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        self.lr, self.gamma, self.optimizer = lr, gamma, optimizer
        self.adam = torch.optim.Adam([self.w], lr=lr, weight_decay=gamma)
        self.prev = None

    def step(self, losses):
        cur = torch.tensor(losses, dtype=torch.float64)
        if self.prev is not None:
            delta = torch.log(self.prev + 1e-8) - torch.log(cur + 1e-8)
            if self.optimizer == "adam":  # official code: VJP of softmax, then Adam(weight_decay=gamma)
                d = torch.autograd.grad(torch.softmax(self.w, -1), self.w, grad_outputs=delta)[0]
                self.w.grad = d
                self.adam.step()
            else:  # Algorithm 1: xi <- xi - beta (J_z^T delta + gamma xi), J_z = diag(z) - z z^T
                with torch.no_grad():
                    z = torch.softmax(self.w, -1)
                    jac = torch.diag(z) - torch.outer(z, z)
                    self.w -= self.lr * (jac.T @ delta + self.gamma * self.w)
        self.prev = cur
        z = torch.softmax(self.w.detach(), -1)
        c = z / (cur + 1e-8)
        return (c / c.sum()).tolist()


@pytest.mark.parametrize("optimizer,lr,gamma", [("adam", 0.025, 0.001), ("sgd", 0.5, 0.01), ("adam", 0.1, 0.0)])
def test_famo_follows_the_paper_update_on_a_scripted_loss_sequence(optimizer, lr, gamma):
    b = build("famo", tasks=TASKS3, optimizer=optimizer, lr=lr, weight_decay=gamma)
    ref = FamoReference(3, lr, gamma, optimizer)
    for step, vals in enumerate(SCRIPT):
        ls = leaves(*vals)
        w = b.backward(as_losses(ls, TASKS3), ctx(step=step))
        want = ref.step(vals)
        assert list(w.values()) == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert [x.grad.item() for x in ls] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert sum(w.values()) == pytest.approx(1.0)
    torch.testing.assert_close(b.xi, ref.w.detach(), rtol=1e-9, atol=1e-12)
    if optimizer == "sgd":  # summed log-loss decreases a > c > b: weight moves from a towards b
        assert b.xi[1] > b.xi[2] > b.xi[0]


def test_famo_first_step_is_uniform_z_and_logits_are_not_parameters():
    b = build("famo")
    assert list(b.parameters()) == []  # xi is internal: never handed to the main optimiser
    assert {"xi", "prev_losses", "adam_m", "adam_v", "adam_steps"} <= set(b.state_dict())
    w = b.backward(as_losses(leaves(1.0, 3.0)), ctx())
    assert w == pytest.approx({"a": 0.75, "b": 0.25})  # (1/2 / 1) : (1/2 / 3)
    assert b.xi.tolist() == [0.0, 0.0]


def test_famo_survives_a_state_round_trip():
    a = build("famo", tasks=TASKS3)
    for step, vals in enumerate(SCRIPT[:4]):
        a.backward(as_losses(leaves(*vals), TASKS3), ctx(step=step))
    ckpt = roundtrip({"balancer": a.state_dict(), "balancer_extra": a.extra_state()})
    b = build("famo", tasks=TASKS3)
    b.load_state_dict(ckpt["balancer"])
    b.load_extra_state(ckpt["balancer_extra"])
    for step, vals in enumerate(SCRIPT[4:], start=4):
        wa = a.backward(as_losses(leaves(*vals), TASKS3), ctx(step=step))
        wb = b.backward(as_losses(leaves(*vals), TASKS3), ctx(step=step))
        assert wa == wb
    assert torch.equal(a.xi, b.xi)


def test_famo_zero_loss_task_gets_no_weight_and_no_logit_change():
    b = build("famo", tasks=TASKS3, optimizer="sgd", lr=0.5, weight_decay=0.0)
    b.backward(as_losses(leaves(1.0, 2.0, 0.5), TASKS3), ctx(step=0))
    ls = leaves(0.0, 1.5, 0.4)
    w = b.backward(as_losses(ls, TASKS3), ctx(step=1))
    assert all(math.isfinite(v) for v in w.values()) and w["a"] == 0.0
    assert w["b"] + w["c"] == pytest.approx(1.0) and ls[0].grad.item() == 0.0
    xi = b.xi.clone()
    assert xi[0].item() == 0.0 and xi[1].item() != 0.0  # only b and c compared their decreases
    assert (xi[1] + xi[2]).item() == pytest.approx(0.0, abs=1e-15)
    # the next step has a present again but absent "before": still no measured decrease for a
    b.backward(as_losses(leaves(0.9, 1.4, 0.35), TASKS3), ctx(step=2))
    assert b.xi[0].item() == 0.0
    # every task absent: no update, weights all 0, nothing NaN
    ls = leaves(0.0, 0.0, 0.0)
    w = b.backward(as_losses(ls, TASKS3), ctx(step=3))
    assert list(w.values()) == [0.0, 0.0, 0.0] and all(x.grad.item() == 0.0 for x in ls)
    assert torch.isfinite(b.xi).all()


# -- every method on a tiny 2-task network ----------------------------------------------------------

class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return h, {k: m(h) for k, m in self.heads.items()}


def tiny_data(missing_b: bool = False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    y = {"a": (x[:, 0] > 0).long(), "b": torch.bucketize(x[:, 1] + x[:, 2], torch.tensor([-0.5, 0.5]))}
    if missing_b:
        y["b"] = torch.full_like(y["b"], MISSING)
    return x, y


def make_run(spec, seed=0):
    torch.manual_seed(seed)
    model = TinyNet()
    balancer = build_balancer(dict(spec), TASKS)
    opt = torch.optim.SGD([{"params": list(model.parameters())},
                           {"params": list(balancer.parameters()), "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    return model, balancer, opt


def train_epochs(model, balancer, opt, epochs, steps=5, missing_b=False):
    x, y = tiny_data(missing_b)
    weights = []
    for epoch in epochs:
        sums = {t.name: 0.0 for t in TASKS}
        for step in range(steps):
            h, logits = model(x)
            losses = {t.name: t.loss(logits[t.name], y[t.name]) for t in TASKS}
            opt.zero_grad(set_to_none=True)
            c = StepContext(h, list(model.trunk.parameters()), list(model.heads.parameters()), step, epoch)
            weights.append(balancer.backward(losses, c))
            opt.step()
            for k, v in losses.items():
                sums[k] += v.item() / steps
        balancer.epoch_end(epoch, sums)
    return weights


def summed_loss(model, missing_b=False):
    x, y = tiny_data(missing_b)
    with torch.no_grad():
        _, logits = model(x)
        return sum(t.loss(logits[t.name], y[t.name]).item() for t in TASKS)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_training_moves_shared_parameters_and_lowers_the_summed_loss(spec):
    model, balancer, opt = make_run(spec)
    trunk0 = model.trunk.weight.detach().clone()
    before = summed_loss(model)
    weights = train_epochs(model, balancer, opt, range(4))
    assert not torch.allclose(model.trunk.weight, trunk0)
    assert summed_loss(model) < 0.9 * before
    assert all(set(w) == {"a", "b"} and all(math.isfinite(v) for v in w.values()) for w in weights)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_a_task_with_no_labels_produces_no_nan(spec):
    model, balancer, opt = make_run(spec)
    x, y = tiny_data(missing_b=True)
    before = TASKS[0].loss(model(x)[1]["a"], y["a"]).item()
    weights = train_epochs(model, balancer, opt, range(3), missing_b=True)
    assert all(math.isfinite(v) for w in weights for v in w.values())
    for p in list(model.parameters()) + list(balancer.parameters()) + list(balancer.buffers()):
        assert torch.isfinite(p).all()
    assert TASKS[0].loss(model(x)[1]["a"], y["a"]).item() < before


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_resume_from_a_checkpoint_is_exact(spec):
    model, balancer, opt = make_run(spec)
    train_epochs(model, balancer, opt, range(4))
    straight = [p.detach().clone() for p in model.parameters()]

    model, balancer, opt = make_run(spec)
    train_epochs(model, balancer, opt, range(2))
    ckpt = roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict(),
                      "balancer": balancer.state_dict(), "balancer_extra": balancer.extra_state()})
    model, balancer, opt = make_run(spec, seed=999)  # fresh objects, different torch seed
    model.load_state_dict(ckpt["model"])
    balancer.load_state_dict(ckpt["balancer"])
    opt.load_state_dict(ckpt["optimizer"])
    balancer.load_extra_state(ckpt["balancer_extra"])
    train_epochs(model, balancer, opt, range(2, 4))
    for a, b in zip(straight, model.parameters()):
        assert torch.equal(a, b)
