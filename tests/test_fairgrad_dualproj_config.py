"""FairGrad, DualProj and ConFIG: known values, each checked against its definition computed on J, and
against TorchJD 0.18 (when it and its optional solver dependencies are installed).

Every test builds a small float64 Jacobian J (tasks x dims), passes G = J Jᵀ to the solver and checks
d = Jᵀw in gradient space.
"""
from __future__ import annotations

import math

import pytest
import torch

from mtlvision.balancing import build_balancer
from mtlvision.balancing.methods.config import config
from mtlvision.balancing.methods.dualproj import dualproj
from mtlvision.balancing.methods.fairgrad import fairgrad
from mtlvision.balancing.methods.nash_mtl import nash_mtl
from mtlvision.balancing.methods.upgrad import upgrad
from mtlvision.balancing.solvers import GramianSolverError
from mtlvision.errors import ConfigError
from mtlvision.tasks import Task

from test_gramian import _make, _quadprog_projector, rand_J, t
from test_gramian import _torchjd_aggregation as _torchjd

F64 = torch.float64
CROSS = [(2, 4, 3), (3, 5, 0), (4, 8, 1), (5, 12, 2), (10, 30, 5)]


def fair_residual(G: torch.Tensor, w: torch.Tensor, alpha: float) -> float:
    """max_i |w_i^{1/α} (Gw)_i − 1|: zero exactly at the α-fair allocation."""
    return float((w ** (1.0 / alpha) * (G @ w) - 1.0).abs().max())


# ----------------------------------------------------------------------------------------------
# FairGrad
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 3.0])
def test_fairgrad_known_values(alpha):
    # orthogonal gradients: d_i w_i = w_i^{-1/α}  =>  w_i = d_i^{-α/(α+1)}
    diag = t([1.0, 4.0, 9.0])
    assert torch.allclose(fairgrad(torch.diag(diag), alpha), diag ** (-alpha / (alpha + 1)), rtol=1e-12)
    # two gradients of norm n at angle θ: symmetric w with (1 + cos θ) n² w = w^{-1/α}
    n, cos = 2.0, -0.6
    J = n * t([[1.0, 0.0], [cos, math.sqrt(1 - cos * cos)]])
    w = fairgrad(J @ J.T, alpha)
    expected = ((1 + cos) * n * n) ** (-alpha / (alpha + 1))
    assert torch.allclose(w, torch.full((2,), expected, dtype=F64), rtol=1e-12)


@pytest.mark.parametrize("T,N,seed", CROSS + [(40, 200, 6)])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_defining_equation_and_never_conflicts(T, N, seed, alpha):
    J = rand_J(T, N, seed)
    J = J * torch.logspace(-1, 1, T, dtype=F64)[:, None]        # norms over two orders of magnitude
    G = J @ J.T
    w = fairgrad(G, alpha)
    assert w.dtype == F64 and bool((w > 0).all())
    assert fair_residual(G, w, alpha) <= 1e-9
    assert float((J @ (J.T @ w)).min()) > 0.0                    # g_iᵀd = w_i^{-1/α} > 0


def test_fairgrad_at_alpha_one_is_nash_mtl():
    for T, N, seed in CROSS:
        G = (lambda J: J @ J.T)(rand_J(T, N, seed))
        w = fairgrad(G, 1.0)
        assert torch.equal(w, nash_mtl(G))
        assert float((w * (G @ w) - 1.0).abs().max()) <= 1e-9      # Nash: Gw = 1/w


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
def test_fairgrad_scaling(alpha):
    J = rand_J(4, 9, 11)
    G = J @ J.T
    w = fairgrad(G, alpha)
    s = 7.0                                     # every gradient × s: w × s^{-2α/(α+1)}, d × s^{(1−α)/(1+α)}
    assert torch.allclose(fairgrad(s * s * G, alpha), w * s ** (-2 * alpha / (alpha + 1)), rtol=1e-8)
    D = torch.diag(t([1.0, 10.0, 1.0, 1.0]))      # one task × 10: the allocation changes unless α = 1
    d, d_scaled = J.T @ w, (D @ J).T @ fairgrad(D @ G @ D, alpha)
    assert float((d - d_scaled).norm()) > 1e-3 * float(d.norm())
    assert fair_residual(D @ G @ D, fairgrad(D @ G @ D, alpha), alpha) <= 1e-9
    d1 = J.T @ fairgrad(G, 1.0)
    assert torch.allclose((D @ J).T @ fairgrad(D @ G @ D, 1.0), d1, rtol=1e-8)


def test_fairgrad_edge_cases():
    J = t([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 1.0, 0.5]])   # task 1 has no gradient
    w = fairgrad(J @ J.T, 2.0)
    assert float(w[1]) == 0.0
    sub = J[[0, 2]]
    assert torch.allclose(w[[0, 2]], fairgrad(sub @ sub.T, 2.0), rtol=1e-12)
    assert torch.equal(fairgrad(torch.zeros(3, 3, dtype=F64), 2.0), torch.zeros(3, dtype=F64))
    assert torch.allclose(fairgrad(t([[4.0]]), 2.0), t([4.0 ** (-2 / 3)]), rtol=1e-12)   # T = 1
    G32 = (rand_J(3, 6, 1) @ rand_J(3, 6, 1).T).float()
    assert fairgrad(G32, 2.0).dtype == torch.float32
    with pytest.raises(GramianSolverError, match="did not converge"):
        fairgrad(rand_J(5, 8, 2) @ rand_J(5, 8, 2).T * 1e3, 2.0, max_iter=1)
    with pytest.raises(ValueError, match="alpha"):
        fairgrad(torch.eye(2, dtype=F64), 0.0)
    tasks = [Task("a", ["0", "1"]), Task("b", ["0", "1"])]
    for bad in (0.0, -1.0):
        with pytest.raises(ConfigError, match=r"balancing\.alpha.*> 0"):
            build_balancer({"method": "fairgrad", "alpha": bad}, tasks)


@pytest.mark.parametrize("T,N,seed", CROSS)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_torchjd_fairgrad(T, N, seed, alpha):
    A = _torchjd()
    J = rand_J(T, N, seed)
    G = J @ J.T
    ref = _make(lambda: A.FairGradWeighting(alpha=alpha), "FairGrad")(G)
    w = fairgrad(G, alpha)
    d, d_ref = J.T @ w, J.T @ ref
    # TorchJD (like the authors' code) runs scipy's least_squares with its default 1e-8 tolerances
    # and no convergence check; ours is solved to 1e-10: agreement to about 1e-9 here.
    assert float((d - d_ref).abs().max()) <= 1e-7 * float(d.abs().max())
    assert fair_residual(G, w, alpha) <= 1e-9


# ----------------------------------------------------------------------------------------------
# DualProj
# ----------------------------------------------------------------------------------------------

def test_dualproj_known_value():
    # mean (−0.5, 0.5) conflicts with g1 = (1, 0); its projection onto {x1 ≥ 0, −2x1 + x2 ≥ 0} is
    # (0, 0.5) = 1.0 g1 + 0.5 g2
    J = t([[1.0, 0.0], [-2.0, 1.0]])
    w = dualproj(J @ J.T, ridge=0.0)
    assert torch.allclose(w, t([1.0, 0.5]), atol=1e-14)
    assert torch.allclose(J.T @ w, t([0.0, 0.5]), atol=1e-14)
    # a mean that conflicts with nobody is its own projection
    J = t([[1.0, 0.2], [0.3, 1.0]])
    assert torch.allclose(dualproj(J @ J.T), t([0.5, 0.5]), atol=1e-15)


@pytest.mark.parametrize("T,N,seed", CROSS + [(40, 200, 6), (6, 3, 7)])
def test_dualproj_is_the_projection_of_the_mean(T, N, seed):
    """KKT of min_{v ≥ p} vᵀGv: w ≥ p, (Gw) ≥ 0 (d conflicts with nobody), (w − p)_j (Gw)_j = 0."""
    J = rand_J(T, N, seed)
    G = J @ J.T
    w = dualproj(G, ridge=0.0)
    Gw, p = G @ w, torch.full((T,), 1.0 / T, dtype=F64)
    scale = float(G.diagonal().max())
    assert float((w - p).min()) >= -1e-15
    assert float(Gw.min()) >= -1e-10 * scale
    assert float(((w - p) * Gw).abs().max()) <= 1e-10 * scale
    d, mean = J.T @ w, J.mean(dim=0)              # no point of the cone is closer to the mean, e.g.
    cone = [J.T @ upgrad(G, ridge=0.0)]           # UPGrad's update and the projected gradients
    cone += [J.T @ upgrad(G, pref=torch.eye(T, dtype=F64)[k], ridge=0.0) for k in range(T)]
    for x in cone:
        assert float((d - mean).norm()) <= float((x - mean).norm()) + 1e-12


def test_dualproj_and_upgrad_share_the_projection():
    J = rand_J(4, 7, 3)
    G = J @ J.T
    for k in range(4):                            # one-hot preference: both project g_k
        e = torch.eye(4, dtype=F64)[k]
        assert torch.allclose(dualproj(G, pref=e), upgrad(G, pref=e), atol=1e-15)
    w = dualproj(torch.zeros(3, 3, dtype=F64))    # no gradients: the mean, w = p
    assert torch.allclose(w, torch.full((3,), 1 / 3, dtype=F64))


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_dualproj(T, N, seed):
    A = _torchjd()
    QuadprogProjector = _quadprog_projector()
    J = rand_J(T, N, seed)
    G = J @ J.T
    exact = _make(lambda: A.DualProjWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0)),
                  "DualProj")(G)
    assert torch.allclose(J.T @ dualproj(G, ridge=0.0), J.T @ exact, atol=1e-12)
    assert torch.allclose(J.T @ dualproj(G), J.T @ exact, atol=1e-10)          # our 1e-12 ridge
    # TorchJD's default: G / trace(G) + 1e-4 I; the same Gramian given to ours gives its weights
    default = A.DualProjWeighting()(G)
    G_reg = G / G.trace() + 1e-4 * torch.eye(T, dtype=F64)
    assert torch.allclose(dualproj(G_reg, ridge=0.0), default, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# ConFIG
# ----------------------------------------------------------------------------------------------

def config_reference(J: torch.Tensor) -> torch.Tensor:
    """The paper's Eq. 2 on J: g_u = U⁺1 of the unit gradients, d = (Σ_i g_iᵀĝ_u) ĝ_u."""
    U = J / J.norm(dim=1, keepdim=True)
    g_u = torch.linalg.pinv(U) @ torch.ones(J.shape[0], dtype=F64)
    unit = g_u / g_u.norm()
    return (J @ unit).sum() * unit


def config_two(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """The official closed form for two gradients (ConFIG_update_double, equal weights)."""
    u1, u2 = g1 / g1.norm(), g2 / g2.norm()
    o1, o2 = g2 - (g2 @ u1) * u1, g1 - (g1 @ u2) * u2
    o1, o2 = o1 / o1.norm(), o2 / o2.norm()
    direction = (o2 @ u1) / (o1 @ u2) * o1 + o2
    unit = direction / direction.norm()
    return (g1 @ unit + g2 @ unit) * unit


def test_config_known_values():
    J = t([[3.0, 0.0], [0.0, 4.0]])               # g_u = (1, 1); length (3 + 4)/√2: d = (3.5, 3.5)
    w = config(J @ J.T)
    assert torch.allclose(w, t([7 / 6, 7 / 8]), atol=1e-15)
    assert torch.allclose(J.T @ w, t([3.5, 3.5]), atol=1e-14)
    assert torch.allclose(config(t([[4.0]])), t([1.0]))                        # T = 1: d = g
    J = t([[1.0, 2.0], [2.0, 4.0]])               # parallel: d = g1 + g2
    assert torch.allclose(J.T @ config(J @ J.T), t([3.0, 6.0]), atol=1e-12)
    J = t([[1.0, 2.0], [-1.0, -2.0]])             # opposite: no direction, w = 0
    assert torch.equal(config(J @ J.T), torch.zeros(2, dtype=F64))
    J = t([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 2.0, 1.0]])   # zero gradient: weight 0, same d
    w = config(J @ J.T)
    assert float(w[1]) == 0.0
    assert torch.allclose(J.T @ w, config_reference(J[[0, 2]]), atol=1e-12)
    assert torch.equal(config(torch.zeros(2, 2, dtype=F64)), torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("T,N,seed", CROSS + [(40, 200, 6)])
def test_config_matches_its_definition_and_is_conflict_free(T, N, seed):
    J = rand_J(T, N, seed) * torch.logspace(-1, 1, T, dtype=F64)[:, None]
    d = J.T @ config(J @ J.T)
    assert torch.allclose(d, config_reference(J), atol=1e-10 * float(d.norm()))
    cos = (J @ d) / (J.norm(dim=1) * d.norm())    # independent gradients: the same cosine with each
    assert float(cos.min()) > 0.0 and float(cos.max() - cos.min()) <= 1e-10
    if T == 2:
        assert torch.allclose(d, config_two(J[0], J[1]), atol=1e-12 * float(d.norm()))


def test_config_with_dependent_gradients_can_conflict_and_flip():
    """T > rank: U g = 1 has no solution, the least-squares g_u conflicts with a task, and rescaling that
    task's loss can reverse d (hence neither `non_conflicting` nor `direction` is promised)."""
    s = 1 / math.sqrt(2)
    J = t([[1.0, 0.0], [0.0, 1.0], [-s, -s]])
    d = J.T @ config(J @ J.T)
    assert torch.allclose(d, config_reference(J), atol=1e-12)
    assert float((J @ d).min()) < 0.0
    D = torch.diag(t([1.0, 1.0, 10.0]))
    d10 = (D @ J).T @ config(D @ J @ J.T @ D)
    assert float(d @ d10) < 0.0 and abs(float(d @ d10)) == pytest.approx(float(d.norm() * d10.norm()))


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_config(T, N, seed):
    A = _torchjd()
    J = rand_J(T, N, seed)
    d, d_ref = J.T @ config(J @ J.T), A.ConFIG()(J)
    assert float((d - d_ref).abs().max()) <= 1e-12 * float(d_ref.abs().max())
