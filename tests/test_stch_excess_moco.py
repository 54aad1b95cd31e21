"""Known-value tests of STCH, ExcessMTL and MoCo against their definitions, the authors' updates (recomputed
here independently) and TorchJD 0.18 where it has the method (ExcessMTL)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlvision.balancing import StepContext, build_balancer
from mtlvision.balancing.gradient import TaskGradients
from mtlvision.balancing.methods.moco import project_simplex
from mtlvision.errors import ConfigError
from mtlvision.tasks import Task

F64 = torch.float64
TASKS = [Task("a", ["0", "1"]), Task("b", ["0", "1"]), Task("c", ["0", "1"])]


def ctx(epoch: int = 0, step: int = 0) -> StepContext:
    return StepContext(torch.zeros(1), [], [], step, epoch)


def stch_step(method, values, epoch, step=0):
    """One STCH step on leaf losses: (reported weights, dL/dL_t by autograd, the scalar)."""
    losses = {t.name: torch.tensor(float(v), dtype=F64, requires_grad=True)
              for t, v in zip(TASKS[:len(values)], values)}
    objective = method.objective(losses, ctx(epoch, step))
    weights = method.backward(losses, ctx(epoch, step))
    grads = [float(losses[n].grad) if losses[n].grad is not None else 0.0 for n in losses]
    return list(weights.values()), grads, float(objective.total.detach())


# -- STCH --------------------------------------------------------------------------------------------

def test_stch_two_tasks_by_hand():
    """n = (1, 1) from a one-epoch warm-up, L = (1, e), mu = 1: f = (0, 1), s = (1, e)/(1 + e), and both
    weights are 2 s_t / L_t = 2 / (1 + e); the scalar is 2 log(1 + e)."""
    m = build_balancer({"method": "stch", "warmup_epochs": 1}, TASKS[:2])
    w, g, total = stch_step(m, [1.0, 1.0], epoch=0)
    assert w == pytest.approx([1.0, 1.0]) and g == pytest.approx([1.0, 1.0])  # warm-up: sum log L, weights 1/L
    w, g, total = stch_step(m, [1.0, math.e], epoch=1)
    assert w == pytest.approx([2 / (1 + math.e)] * 2, rel=1e-14)
    assert g == pytest.approx(w, rel=1e-14)
    assert total == pytest.approx(2 * math.log(1 + math.e), rel=1e-14)


def test_stch_matches_the_authors_update():
    """Warm-up epochs of sum log L, the measuring epoch's mean losses as n, then the authors' scalar
    T mu log sum exp((log(L/n + 1e-20) - max)/mu) (STCH_MTL/LibMTL/weighting/STCH.py) recomputed here: the same
    gradient with respect to every loss."""
    rng = np.random.default_rng(0)
    mu, warm = 0.7, 2
    m = build_balancer({"method": "stch", "mu": mu, "warmup_epochs": warm}, TASKS)
    measured = []
    for epoch in range(warm):
        for step in range(3):
            L = rng.uniform(0.2, 3.0, 3)
            w, g, _ = stch_step(m, L, epoch, step)
            assert w == pytest.approx((1 / L).tolist(), rel=1e-14) and g == pytest.approx(w, rel=1e-14)
            if epoch == warm - 1:
                measured.append(L)
    nadir = torch.tensor(np.mean(measured, 0), dtype=F64)
    for step in range(4):
        L = torch.tensor(rng.uniform(0.2, 3.0, 3), dtype=F64, requires_grad=True)
        f = torch.log(L / nadir + 1e-20)
        authors = mu * torch.log(torch.sum(torch.exp((f - f.detach().max()) / mu))) * 3
        (ref,) = torch.autograd.grad(authors, L)
        w, g, _ = stch_step(m, L.detach().tolist(), warm, step)
        assert g == pytest.approx(ref.tolist(), rel=1e-12)
        assert w == pytest.approx(ref.tolist(), rel=1e-12)
    assert torch.allclose(m.normaliser, nadir, rtol=1e-15)


def test_stch_preference_and_absent_task():
    """lambda (rescaled to mean 1) multiplies f; an absent task (loss 0) leaves the log-sum-exp, gets weight 0,
    and the others are weighted as STCH of the present tasks alone (T = number present)."""
    m = build_balancer({"method": "stch", "mu": 0.5, "warmup_epochs": 0, "preference": {"a": 3.0}}, TASKS)
    stch_step(m, [2.0, 1.0, 4.0], epoch=0)  # n = the first losses
    lam = np.array([3.0, 1.0, 1.0]) / (5.0 / 3.0)
    L = np.array([1.0, 2.0, 2.0])
    f = np.log(L / np.array([2.0, 1.0, 4.0]))
    z = lam * f / 0.5
    s = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    w, g, total = stch_step(m, L, epoch=0, step=1)
    assert w == pytest.approx((3 * lam * s / L).tolist(), rel=1e-13) and g == pytest.approx(w, rel=1e-13)
    assert total == pytest.approx(3 * 0.5 * math.log(np.exp(z).sum()), rel=1e-13)
    w, g, _ = stch_step(m, [1.0, 0.0, 2.0], epoch=0, step=2)
    keep = np.array([0, 2])
    zz = z[keep]
    ss = np.exp(zz) / np.exp(zz).sum()
    assert w[1] == 0.0 and g[1] == 0.0
    assert [w[0], w[2]] == pytest.approx((2 * lam[keep] * ss / L[keep]).tolist(), rel=1e-13)


def test_stch_task_absent_from_the_measuring_epoch_is_normalised_at_its_first_step():
    m = build_balancer({"method": "stch", "warmup_epochs": 1}, TASKS[:2])
    stch_step(m, [2.0, 0.0], epoch=0)
    assert m.normaliser.tolist() == [0.0, 0.0] and m.loss_count.tolist() == [1.0, 0.0]
    w, _, _ = stch_step(m, [2.0, 0.0], epoch=1)
    assert w == pytest.approx([1 / 2.0, 0.0])  # one present task: weight 1/L
    assert m.normaliser.tolist() == [2.0, 0.0]
    stch_step(m, [1.0, 5.0], epoch=1, step=1)
    assert m.normaliser.tolist() == [2.0, 5.0]


@pytest.mark.parametrize("params,key", [({"mu": 0.0}, "mu"), ({"warmup_epochs": -1}, "warmup_epochs"),
                                        ({"preference": {"z": 1.0}}, "preference"),
                                        ({"preference": {"a": 0.0}}, "preference")])
def test_stch_bad_parameters(params, key):
    with pytest.raises(ConfigError, match=f"balancing.{key}"):
        build_balancer({"method": "stch", **params}, TASKS)


# -- ExcessMTL ---------------------------------------------------------------------------------------

def excess_step(method, J: torch.Tensor, losses=None, epoch: int = 0):
    losses = torch.ones(len(J), dtype=F64) if losses is None else torch.as_tensor(losses, dtype=F64)
    result = method.combine(TaskGradients(J, J @ J.T, losses), ctx(epoch))
    method.commit(result.state)
    return result


def authors_excess_mtl(Js: list[torch.Tensor], eta: float) -> list[torch.Tensor]:
    """The authors' ExcessMTL.backward (yifei-he/ExcessMTL, LibMTL/weighting/ExcessMTL.py) restated: weights
    start at 1, the first step records the initial excess risks, later steps multiply by exp(eta w / w0) and
    renormalise to sum T."""
    T = len(Js[0])
    loss_weight, grad_sum, initial, out = torch.ones(T, dtype=F64), torch.zeros_like(Js[0]), None, []
    for J in Js:
        w = torch.zeros(T, dtype=F64)
        for i in range(T):
            grad_sum[i] += J[i] ** 2
            w[i] = (J[i] * (1 / torch.sqrt(grad_sum[i] + 1e-7))) @ J[i]
        if initial is None:
            initial = w
        else:
            loss_weight = loss_weight * torch.exp(w / initial * eta)
            loss_weight = loss_weight / loss_weight.sum() * T
        out.append(loss_weight.clone())
    return out


def test_excess_mtl_two_tasks_by_hand():
    """N = 1, g = (1, 2) then (2, 2): e⁰ = (1/√(1+ε), 4/√(4+ε)), r = (4/√(5+ε), 4/√(8+ε)) / e⁰, α ∝ exp(η r)."""
    eps, eta = 1e-7, 0.5
    m = build_balancer({"method": "excess_mtl", "robust_step_size": eta}, TASKS[:2])
    first = excess_step(m, torch.tensor([[1.0], [2.0]], dtype=F64))
    assert first.weights.tolist() == pytest.approx([1.0, 1.0], rel=1e-15)
    r = [4 / math.sqrt(5 + eps) * math.sqrt(1 + eps), 4 / math.sqrt(8 + eps) * math.sqrt(4 + eps) / 4]
    a = [math.exp(eta * x) for x in r]
    expect = [2 * x / sum(a) for x in a]
    second = excess_step(m, torch.tensor([[2.0], [2.0]], dtype=F64))
    assert second.weights.tolist() == pytest.approx(expect, rel=1e-14)
    assert second.update.tolist() == pytest.approx([2 * expect[0] + 2 * expect[1]], rel=1e-14)


def test_excess_mtl_matches_the_authors_update():
    g = torch.Generator().manual_seed(3)
    Js = [torch.randn(3, 11, generator=g, dtype=F64) * (1 + k % 3) for k in range(8)]
    m = build_balancer({"method": "excess_mtl", "robust_step_size": 0.3}, TASKS)
    for J, ref in zip(Js, authors_excess_mtl(Js, 0.3)):
        result = excess_step(m, J)
        assert torch.allclose(result.weights, ref, rtol=1e-13, atol=0)
        assert torch.allclose(result.update, ref @ J, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("warmup", [0, 1])
@pytest.mark.parametrize("scale,tol", [(1.0, 1e-7), (1e3, 1e-10)])
def test_excess_mtl_matches_torchjd(warmup, scale, tol):
    """TorchJD 0.18 `ExcessMTLWeighting` normalises α to sum 1 and, without warm-up, updates α on its first call
    with the raw e; with n_warmup_steps = k it equals this method with k warm-up steps, up to its 1e-7 added to
    e⁰: max |Δ| = 2.3e-8 with O(1) gradients and 2.3e-11 with gradients × 1e3 (it scales as 1e-7 / e⁰)."""
    A = pytest.importorskip("torchjd.aggregation")
    g = torch.Generator().manual_seed(5)
    Js = [scale * torch.randn(3, 9, generator=g, dtype=F64) * torch.tensor([[1.0], [3.0], [0.3]], dtype=F64)
          for _ in range(10)]
    steps_in_warmup = 3 if warmup else 1
    jd = A.ExcessMTLWeighting(robust_step_size=0.5, n_warmup_steps=steps_in_warmup)
    m = build_balancer({"method": "excess_mtl", "robust_step_size": 0.5, "warmup_epochs": warmup}, TASKS)
    worst = 0.0
    for k, J in enumerate(Js):
        ref = jd(J)
        epoch = 0 if k < steps_in_warmup and warmup else 1
        ours = excess_step(m, J, epoch=epoch).weights / 3
        worst = max(worst, float((ours - ref).abs().max()))
    assert worst < tol, worst


def test_excess_mtl_absent_task_keeps_its_weight():
    g = torch.Generator().manual_seed(1)
    m = build_balancer({"method": "excess_mtl", "robust_step_size": 1.0}, TASKS)
    for _ in range(3):
        excess_step(m, torch.randn(3, 4, generator=g, dtype=F64))
    before = m.alpha.clone()
    J = torch.randn(3, 4, generator=g, dtype=F64)
    J[1] = 0.0
    result = excess_step(m, J, losses=[1.0, 0.0, 2.0])
    assert float(m.alpha[1]) == float(before[1])
    assert float(m.alpha.sum()) == pytest.approx(1.0, rel=1e-15)
    assert result.weights[1] == pytest.approx(3 * float(before[1]), rel=1e-15)
    # a task first present later gets its baseline then
    m = build_balancer({"method": "excess_mtl"}, TASKS)
    J[1] = 0.0
    excess_step(m, J, losses=[1.0, 0.0, 2.0])
    assert float(m.baseline[1]) == 0.0 and float(m.baseline[0]) > 0
    J[1] = 1.0
    excess_step(m, J)
    assert float(m.baseline[1]) > 0


@pytest.mark.parametrize("params,key", [({"robust_step_size": 0.0}, "robust_step_size"),
                                        ({"robust_step_size": float("inf")}, "robust_step_size"),
                                        ({"warmup_epochs": -2}, "warmup_epochs")])
def test_excess_mtl_bad_parameters(params, key):
    with pytest.raises(ConfigError, match=f"balancing.{key}"):
        build_balancer({"method": "excess_mtl", **params}, TASKS)


# -- MoCo --------------------------------------------------------------------------------------------

def simplex_by_bisection(v: np.ndarray) -> np.ndarray:
    """Projection onto the simplex by bisection on the threshold theta (sum max(v - theta, 0) = 1)."""
    lo, hi = v.min() - 1.0, v.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(v - mid, 0).sum() > 1 else (lo, mid)
    return np.maximum(v - 0.5 * (lo + hi), 0)


def moco_step_(method, J, losses=None):
    losses = torch.ones(len(J), dtype=F64) if losses is None else torch.as_tensor(losses, dtype=F64)
    result = method.combine(TaskGradients(J, J @ J.T, losses), ctx())
    method.commit(result.state)
    return result


def test_moco_two_tasks_by_hand():
    """β = 1 (y = g), γ = 0.1: λ − γ YYᵀλ = (.5, .5) − .1 (.5, 2) = (.45, .3), projected: (.575, .425);
    d = .575 (1, 0) + .425 (0, 2)."""
    m = build_balancer({"method": "moco", "beta": 1.0, "beta_sigma": 0.0, "gamma": 0.1}, TASKS[:2])
    result = moco_step_(m, torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=F64))
    assert result.weights.tolist() == pytest.approx([0.575, 0.425], rel=1e-14)
    assert result.update.tolist() == pytest.approx([0.575, 0.85], rel=1e-14)


def test_moco_matches_the_paper_update_recomputed():
    """Algorithm 1 of the paper, restated in numpy with a bisection projection: y, λ and d agree over steps."""
    p = {"beta": 0.4, "beta_sigma": 0.3, "gamma": 0.2, "gamma_sigma": 0.6, "rho": 0.05}
    m = build_balancer({"method": "moco", **p}, TASKS)
    rng = np.random.default_rng(7)
    y, lam = np.zeros((3, 6)), np.full(3, 1 / 3)
    for k in range(1, 9):
        J = rng.normal(size=(3, 6)) * np.array([[1.0], [4.0], [0.5]])
        y = y - p["beta"] / k ** p["beta_sigma"] * (y - J)
        lam = simplex_by_bisection(lam - p["gamma"] / k ** p["gamma_sigma"] * (y @ y.T @ lam + p["rho"] * lam))
        result = moco_step_(m, torch.tensor(J))
        assert np.allclose(result.weights.numpy(), lam, rtol=0, atol=1e-12)
        assert np.allclose(result.update.numpy(), lam @ y, rtol=0, atol=1e-12)
        assert np.allclose(m.tracked.numpy(), y, rtol=0, atol=1e-13)


def test_project_simplex():
    assert project_simplex(torch.tensor([0.2, 0.3, 0.5], dtype=F64)).tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert project_simplex(torch.tensor([2.0, 0.0], dtype=F64)).tolist() == [1.0, 0.0]
    assert project_simplex(torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=F64)).tolist() == [0.25] * 4
    v = torch.randn(7, dtype=F64, generator=torch.Generator().manual_seed(0)) * 3
    assert np.allclose(project_simplex(v).numpy(), simplex_by_bisection(v.numpy()), atol=1e-12)
    with pytest.raises(ValueError):
        project_simplex(torch.tensor([float("nan"), 1.0], dtype=F64))


def test_moco_absent_and_unseen_tasks():
    """A task never present has λ = 0 (the others on the simplex among themselves); an absent task's tracked
    gradient is kept, not decayed towards its zero gradient."""
    m = build_balancer({"method": "moco"}, TASKS)
    g = torch.Generator().manual_seed(2)
    J = torch.randn(3, 5, generator=g, dtype=F64)
    J[2] = 0.0
    result = moco_step_(m, J, losses=[1.0, 1.0, 0.0])
    assert float(result.weights[2]) == 0.0 and float(result.weights.sum()) == pytest.approx(1.0)
    assert m.tracked[2].abs().sum() == 0 and m.seen.tolist() == [True, True, False]
    J2 = torch.randn(3, 5, generator=g, dtype=F64)
    moco_step_(m, J2)
    kept = m.tracked[1].clone()
    J3 = torch.randn(3, 5, generator=g, dtype=F64)
    J3[1] = 0.0
    moco_step_(m, J3, losses=[1.0, 0.0, 1.0])
    assert torch.equal(m.tracked[1], kept)


@pytest.mark.parametrize("params,key", [({"beta": 0.0}, "beta"), ({"beta": 1.5}, "beta"), ({"gamma": -1.0}, "gamma"),
                                        ({"beta_sigma": -0.1}, "beta_sigma"), ({"rho": -1.0}, "rho")])
def test_moco_bad_parameters(params, key):
    with pytest.raises(ConfigError, match=f"balancing.{key}"):
        build_balancer({"method": "moco", **params}, TASKS)


@pytest.mark.parametrize("method", ["moco", "excess_mtl"])
def test_feature_space_is_refused(method):
    with pytest.raises(ConfigError):
        build_balancer({"method": method, "space": "feature"}, TASKS)
