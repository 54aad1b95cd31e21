"""Known-value tests of STCH against its definition and the authors' update (recomputed here independently)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtlvision.balancing import StepContext, build_balancer
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
