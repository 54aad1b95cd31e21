"""Gramian-form gradient-balancing weights (the solvers in balancing/methods/): each checked against its
definition computed on J.

Every test builds a small float64 Jacobian J (tasks x dims), passes G = J Jᵀ to the function and
checks d = Jᵀw directly in gradient space. The TorchJD cross-checks at the end run only when
`torchjd` (and, per method, its optional solver dependencies) can be imported.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from mtlvision.balancing.methods.aligned_mtl import aligned_mtl
from mtlvision.balancing.methods.cagrad import cagrad
from mtlvision.balancing.methods.gradvac import gradvac
from mtlvision.balancing.methods.imtl_g import imtl_g
from mtlvision.balancing.methods.mgda import mgda
from mtlvision.balancing.methods.nash_mtl import nash_mtl
from mtlvision.balancing.methods.pcgrad import pcgrad
from mtlvision.balancing.methods.upgrad import upgrad
from mtlvision.balancing.solvers import GramianSolverError

F64 = torch.float64


def gram(J: torch.Tensor) -> torch.Tensor:
    return J @ J.T


def agg(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return J.T @ w.to(F64)


def rand_J(T: int, N: int, seed: int, conflict: bool = True) -> torch.Tensor:
    """A random Jacobian; with `conflict`, task 1 is made to point against task 0."""
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(T, N, generator=g, dtype=F64)
    if conflict and T >= 2:
        J[1] = -0.8 * J[0] + 0.6 * J[1]
    return J


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


# ----------------------------------------------------------------------------------------------
# MGDA
# ----------------------------------------------------------------------------------------------

def segment_min_norm(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Closed form: the point of the segment [g1, g2] closest to the origin."""
    diff = g1 - g2
    denom = float(diff @ diff)
    gamma = 0.0 if denom == 0.0 else min(max(float((g2 - g1) @ g2) / denom, 0.0), 1.0)
    return gamma * g1 + (1.0 - gamma) * g2


@pytest.mark.parametrize("J", [
    t([[1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]]),          # conflicting: interior of the segment
    t([[1.0, 1.0, 0.0], [3.0, 3.0, 0.1]]),           # dominated: the vertex g1
    t([[2.0, -1.0, 0.5], [2.0, -1.0, 0.5]]),         # identical gradients
    t([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]),           # one zero gradient: d = 0
    rand_J(2, 7, 0), rand_J(2, 20, 1), rand_J(2, 5, 2, conflict=False),
])
@pytest.mark.parametrize("exact", [True, False])
def test_mgda_two_tasks_is_the_segment_min_norm_point(J, exact):
    w = mgda(gram(J), exact=exact)
    assert w.shape == (2,) and w.dtype == F64
    assert float(w.min()) >= 0.0 and abs(float(w.sum()) - 1.0) < 1e-12
    expected = segment_min_norm(J[0], J[1])
    assert torch.allclose(agg(J, w), expected, atol=1e-12 * (1 + float(J.abs().max()) ** 2))


@pytest.mark.parametrize("J", [
    rand_J(3, 5, 10), rand_J(3, 8, 11), rand_J(3, 3, 12), rand_J(3, 20, 13, conflict=False),
    t([[1.0, 0.0], [-1.0, 0.2], [0.0, 5.0]]),        # optimum on an edge: task 2 gets weight 0
    t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.0, 0.0]]),  # 0 in the hull: d = 0
])
def test_mgda_kkt_conditions_three_tasks(J):
    G = gram(J)
    w = mgda(G)
    scale = float(G.diagonal().mean())
    obj = float(w @ G @ w)
    Gw = G @ w
    assert float(w.min()) >= 0.0 and abs(float(w.sum()) - 1.0) < 1e-12
    # KKT of min wᵀGw on the simplex: (Gw)_i >= wᵀGw for all i, with equality where w_i > 0.
    assert float((Gw - obj).min()) >= -1e-10 * scale
    support = w > 1e-9
    assert float((Gw[support] - obj).abs().max()) <= 1e-10 * scale
    # and no vertex or random convex combination has a smaller norm
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        v = torch.rand(3, generator=g, dtype=F64) ** 3
        v /= v.sum()
        assert float(v @ G @ v) >= obj - 1e-12 * scale


def test_mgda_edge_case_weight_is_zero():
    J = t([[1.0, 0.0], [-1.0, 0.2], [0.0, 5.0]])
    w = mgda(gram(J))
    assert float(w[2]) == 0.0
    assert torch.allclose(agg(J, w), segment_min_norm(J[0], J[1]), atol=1e-14)


def test_mgda_frank_wolfe_alone_approaches_the_exact_point():
    J = rand_J(4, 9, 21)
    G = gram(J)
    exact = mgda(G)
    fw = mgda(G, exact=False, max_iter=20000, tol=1e-12)
    e_obj, f_obj = float(exact @ G @ exact), float(fw @ G @ fw)
    assert e_obj <= f_obj + 1e-14
    assert f_obj <= e_obj * (1 + 1e-3)


def test_mgda_keeps_dtype_and_scale_invariance():
    J = rand_J(3, 6, 5)
    w32 = mgda(gram(J).float())
    assert w32.dtype == torch.float32 and w32.shape == (3,)
    assert torch.allclose(mgda(gram(J)), mgda(1e6 * gram(J)), atol=1e-10)


# ----------------------------------------------------------------------------------------------
# PCGrad
# ----------------------------------------------------------------------------------------------

def pcgrad_reference(J: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1) directly on the gradients, same permutation draws."""
    T = J.shape[0]
    d = torch.zeros(J.shape[1], dtype=F64)
    for i in range(T):
        perm = torch.randperm(T, generator=gen).tolist()
        gi = J[i].clone()
        for j in perm:
            if j == i:
                continue
            dot = float(gi @ J[j])
            if dot < 0.0:
                gi = gi - dot / float(J[j] @ J[j]) * J[j]
        d += gi
    return d


def test_pcgrad_conflicting_pair_removes_exactly_the_conflicting_component():
    J = t([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0]])
    w = pcgrad(gram(J))
    g1, g2 = J
    g1p = g1 - float(g1 @ g2) / float(g2 @ g2) * g2      # (0.5, 0.5, 0)
    g2p = g2 - float(g2 @ g1) / float(g1 @ g1) * g1      # (0, 1, 0)
    assert float(g1p @ g2) == 0.0 and float(g2p @ g1) == 0.0
    d = agg(J, w)
    assert torch.allclose(d, g1p + g2p, atol=1e-15)
    assert torch.allclose(d, t([0.5, 1.5, 0.0]), atol=1e-15)
    assert float((J @ d).min()) >= 0.0


def test_pcgrad_without_conflict_is_the_sum():
    J = t([[1.0, 0.2, 0.0], [0.5, 1.0, -0.1], [0.3, 0.3, 0.3]])
    assert torch.equal(pcgrad(gram(J)), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("T,N,seed", [(3, 5, 0), (4, 6, 1), (4, 12, 2), (5, 4, 3)])
def test_pcgrad_equals_direct_implementation_with_same_permutations(T, N, seed):
    J = rand_J(T, N, seed)
    J[2] = -0.5 * J[1] + 0.2 * J[2]
    w = pcgrad(gram(J), generator=torch.Generator().manual_seed(seed))
    expected = pcgrad_reference(J, torch.Generator().manual_seed(seed))
    assert torch.allclose(agg(J, w), expected, atol=1e-12)


def test_pcgrad_zero_gradient_task_is_harmless():
    J = t([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-1.0, 1.0, 1.0]])
    w = pcgrad(gram(J), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(w).all()
    expected = pcgrad_reference(J, torch.Generator().manual_seed(0))
    assert torch.allclose(agg(J, w), expected, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# CAGrad
# ----------------------------------------------------------------------------------------------

def cagrad_dual_value(G: torch.Tensor, wf: torch.Tensor, c: float) -> float:
    """Recover the inner w* from the final weights 1/T + k w*, and evaluate the dual objective."""
    T = G.shape[0]
    k = float(wf.sum()) - 1.0
    w_star = (wf - 1.0 / T) / k
    assert float(w_star.min()) >= -1e-9 and abs(float(w_star.sum()) - 1.0) < 1e-9
    b = G.mean(dim=1)
    g0 = math.sqrt(float(G.mean()))
    return float(w_star @ b) + c * g0 * math.sqrt(float(w_star @ G @ w_star))


@pytest.mark.parametrize("c", [0.2, 0.4, 0.8])
@pytest.mark.parametrize("T,N,seed", [(2, 5, 0), (3, 6, 1), (4, 10, 2), (3, 3, 3), (5, 4, 4)])
def test_cagrad_ball_constraint_worst_case_and_optimality(c, T, N, seed):
    J = rand_J(T, N, seed)
    G = gram(J)
    w = cagrad(G, c=c)
    d = agg(J, w)
    g0 = J.mean(dim=0)
    radius = c * float(g0.norm())
    # the paper's constraint, active at the optimum
    assert float((d - g0).norm()) <= radius * (1 + 1e-9)
    assert float((d - g0).norm()) >= radius * (1 - 1e-9)
    # worst-case local decrease improves on g0
    worst = float((J @ d).min())
    assert worst >= float((J @ g0).min()) - 1e-12
    # optimality certificate: primal value (feasible d) equals the dual value (feasible w*)
    dual = cagrad_dual_value(G, w, c)
    assert abs(worst - dual) <= 1e-9 * float(G.diagonal().max())
    # and no other point of the ball does better
    g = torch.Generator().manual_seed(seed)
    for _ in range(300):
        z = torch.randn(N, generator=g, dtype=F64)
        cand = g0 + radius * z / z.norm()
        assert float((J @ cand).min()) <= worst + 1e-12


def test_cagrad_c_zero_and_rescale():
    J = rand_J(3, 5, 7)
    G = gram(J)
    assert torch.allclose(cagrad(G, c=0.0), torch.full((3,), 1 / 3, dtype=F64))
    assert torch.allclose(cagrad(G, c=0.5, rescale=True), cagrad(G, c=0.5) / 1.25,
                          atol=1e-12)
    with pytest.raises(ValueError):
        cagrad(G, c=-1.0)


def test_cagrad_pareto_stationary_point_gives_no_step():
    J = t([[1.0, 0.0], [-1.0, 0.0]])                 # g0 = 0: d = g0 = 0
    assert float(agg(J, cagrad(gram(J))).norm()) == 0.0
    J = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, -1.2, 0.0]])  # 0 in the hull, large c
    w = cagrad(gram(J), c=2.0)
    assert torch.isfinite(w).all()
    assert float(agg(J, w).norm()) <= 1e-9


# ----------------------------------------------------------------------------------------------
# IMTL-G
# ----------------------------------------------------------------------------------------------

def projections(J: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    u = J / J.norm(dim=1, keepdim=True)
    return u @ agg(J, w)


@pytest.mark.parametrize("T,N,seed", [(2, 3, 0), (3, 5, 1), (4, 6, 2), (4, 20, 3), (3, 3, 4)])
def test_imtl_g_equal_projections_on_unit_gradients(T, N, seed):
    J = rand_J(T, N, seed)
    G = gram(J)
    w = imtl_g(G)
    assert abs(float(w.sum()) - 1.0) < 1e-12
    p = projections(J, w)
    assert float((p - p[0]).abs().max()) <= 1e-10 * float(p.abs().max())
    # equals the Gramian characterisation G w ∝ (||g_t||)_t with Σw = 1
    v = torch.linalg.solve(G, G.diagonal().sqrt())
    assert torch.allclose(w, v / v.sum(), atol=1e-9)


def test_imtl_g_dependent_gradients_and_zero_gradient():
    J = t([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [-1.0, 0.5, 1.0]])  # two identical rows
    w = imtl_g(gram(J))
    assert torch.isfinite(w).all()
    p = projections(J, w)
    assert float((p - p[0]).abs().max()) <= 1e-9 * float(p.abs().max())
    assert abs(float(w.sum()) - 1.0) < 1e-9
    J = t([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]])  # a zero gradient: weight 0
    w = imtl_g(gram(J))
    assert float(w[0]) == 0.0
    p = projections(J[1:], w[1:])
    assert abs(float(p[0] - p[1])) <= 1e-12
    assert torch.equal(imtl_g(torch.zeros(3, 3, dtype=F64)), torch.zeros(3, dtype=F64))


# ----------------------------------------------------------------------------------------------
# Nash-MTL
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T,N,seed", [(2, 3, 0), (3, 5, 1), (4, 6, 2), (4, 20, 3), (5, 5, 4)])
def test_nash_mtl_bargaining_condition(T, N, seed):
    J = 3.0 * rand_J(T, N, seed)
    G = gram(J)
    w = nash_mtl(G)
    assert float(w.min()) > 0.0
    Gw = G @ w
    assert float((Gw - 1.0 / w).abs().max()) <= 1e-6 * max(1.0, float((1.0 / w).max()))
    assert float((w * Gw - 1.0).abs().max()) <= 1e-6
    d = agg(J, w)
    assert abs(float(d @ d) - T) <= 1e-6 * T           # ||d||² = αᵀGα = T
    assert torch.allclose(nash_mtl(4.0 * G), w / 2.0, rtol=1e-7)


def test_nash_mtl_singular_gramians():
    J = t([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]])       # identical: G = 9·11ᵀ, α = 1/√18 each
    w = nash_mtl(gram(J))
    assert torch.allclose(w, torch.full((2,), 1 / math.sqrt(18.0), dtype=F64), rtol=1e-6)
    J = t([[1.0, 0.0], [-1.0, 0.0]])                 # opposite: no exact solution, d -> 0
    w = nash_mtl(gram(J))
    assert torch.isfinite(w).all() and float(w.min()) > 0.0
    assert float(agg(J, w).norm()) <= 1e-6
    J = t([[1.0, 0.0], [-0.99, 0.05]])               # nearly opposite but solvable
    w = nash_mtl(gram(J))
    Gw = gram(J) @ w
    assert float((w * Gw - 1.0).abs().max()) <= 1e-6
    assert torch.equal(nash_mtl(torch.zeros(2, 2, dtype=F64)), torch.zeros(2, dtype=F64))


def test_nash_mtl_non_convergence_raises():
    G = gram(rand_J(4, 6, 9))
    with pytest.raises(GramianSolverError, match="did not converge"):
        nash_mtl(G, max_iter=1)


# ----------------------------------------------------------------------------------------------
# UPGrad
# ----------------------------------------------------------------------------------------------

def dual_cone_projection_bruteforce(J: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Projection of g onto {x : Jx >= 0} by enumerating the active sets (tiny cases only)."""
    T = J.shape[0]
    best, best_dist = None, math.inf
    for k in range(T + 1):
        for A in itertools.combinations(range(T), k):
            if A:
                JA = J[list(A)]
                x = g - JA.T @ (torch.linalg.pinv(JA @ JA.T) @ (JA @ g))
            else:
                x = g.clone()
            if float((J @ x).min()) >= -1e-10:
                dist = float((x - g).norm())
                if dist < best_dist:
                    best, best_dist = x, dist
    return best


@pytest.mark.parametrize("T,N,seed", [(3, 4, 0), (3, 3, 1), (4, 3, 2), (4, 5, 3), (2, 2, 4)])
def test_upgrad_is_mean_of_dual_cone_projections(T, N, seed):
    J = rand_J(T, N, seed)
    J[-1] = -0.9 * J[0] + 0.3 * J[-1]
    G = gram(J)
    projs = [dual_cone_projection_bruteforce(J, J[i]) for i in range(T)]
    for ridge, tol in [(0.0, 1e-12), (1e-12, 1e-10)]:       # exact, and the default ridge
        d = agg(J, upgrad(G, ridge=ridge))
        assert torch.allclose(d, torch.stack(projs).mean(dim=0), atol=1e-9)
        assert float((J @ d).min()) >= -tol * float(G.diagonal().max())
    # one projection alone (pref = e_0 picks π(g_0))
    pref = torch.zeros(T, dtype=F64)
    pref[0] = 1.0
    assert torch.allclose(agg(J, upgrad(G, pref=pref)), projs[0], atol=1e-9)


@pytest.mark.parametrize("seed", range(6))
def test_upgrad_never_conflicts(seed):
    J = rand_J(5, 8, seed)
    J[2] = -J[3] + 0.1 * J[2]
    J[4] *= 30.0
    scale = float(gram(J).diagonal().max())
    assert float((J @ agg(J, upgrad(gram(J), ridge=0.0))).min()) >= -1e-12 * scale
    assert float((J @ agg(J, upgrad(gram(J)))).min()) >= -1e-10 * scale
    # nearly opposite gradients: the ridge keeps the solve accurate (bounded weights)
    J[1] = -J[0] + 1e-6 * J[1]
    w = upgrad(gram(J))
    assert torch.isfinite(w).all()
    assert float((J @ agg(J, w)).min()) >= -1e-6 * scale
    # float32 Gramian: conflicts only at float32 rounding level
    w32 = upgrad(gram(J).float())
    assert float((J @ agg(J, w32)).min()) >= -1e-4 * scale


def test_upgrad_special_cases():
    J = t([[1.0, 0.2, 0.0], [0.5, 1.0, -0.1]])       # no conflict: the mean gradient
    assert torch.allclose(upgrad(gram(J)), torch.full((2,), 0.5, dtype=F64), atol=1e-15)
    J = t([[1.0, 2.0], [-1.0, -2.0]])                # opposite: dual cone is the orthogonal line
    assert float(agg(J, upgrad(gram(J))).norm()) <= 1e-12
    J = t([[1.0, 2.0], [1.0, 2.0], [-1.0, 1.0]])     # duplicated row, singular G
    d = agg(J, upgrad(gram(J)))
    projs = torch.stack([dual_cone_projection_bruteforce(J, J[i]) for i in range(3)])
    assert torch.allclose(d, projs.mean(dim=0), atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Aligned-MTL
# ----------------------------------------------------------------------------------------------

def balance_matrix(G: torch.Tensor) -> torch.Tensor:
    T = G.shape[0]
    return torch.stack([aligned_mtl(G, pref=torch.eye(T, dtype=F64)[k]) for k in range(T)], 1)


@pytest.mark.parametrize("T,N,seed", [(2, 3, 0), (3, 8, 1), (4, 6, 2), (4, 20, 3)])
def test_aligned_mtl_equalises_singular_values(T, N, seed):
    J = rand_J(T, N, seed)
    G = gram(J)
    B = balance_matrix(G)
    sv = torch.linalg.svdvals(J.T @ B)
    sigma_min = float(torch.linalg.svdvals(J).min())
    assert torch.allclose(sv, torch.full_like(sv, sigma_min), rtol=1e-9)
    w = aligned_mtl(G)
    assert torch.allclose(w, B @ torch.full((T,), 1.0 / T, dtype=F64), atol=1e-12)
    assert torch.allclose(aligned_mtl(G, pref=torch.ones(T)), T * w, atol=1e-12)


def test_aligned_mtl_rank_deficient():
    J = t([[1.0, 0.0, 2.0, 0.0], [0.0, 1.0, -1.0, 0.5], [1.0, 1.0, 1.0, 0.5]])  # g3 = g1 + g2
    G = gram(J)
    B = balance_matrix(G)
    assert torch.isfinite(B).all()
    sv = torch.linalg.svdvals(J.T @ B)
    nonzero = sv[sv > 1e-8 * float(sv.max())]
    assert nonzero.numel() == 2
    assert float((nonzero - nonzero[0]).abs().max()) <= 1e-9 * float(nonzero[0])
    s = torch.linalg.svdvals(J)
    assert abs(float(nonzero[0]) - float(s[1])) <= 1e-9 * float(s[1])  # smallest kept σ
    # float32 Gramian: rounding noise must not count as a direction
    w32 = aligned_mtl(G.float())
    assert w32.dtype == torch.float32
    assert torch.allclose(w32.double(), aligned_mtl(G), rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# GradVac
# ----------------------------------------------------------------------------------------------

def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / float(a.norm() * b.norm())


def pair_with_cosine(phi: float, n1: float = 2.0, n2: float = 0.5) -> torch.Tensor:
    return t([[n1, 0.0, 0.0, 0.0], [n2 * phi, n2 * math.sqrt(1 - phi * phi), 0.0, 0.0]])


def test_gradvac_correction_reaches_target_and_ema_updates():
    J = pair_with_cosine(-0.3)
    ema = t([[0.0, 0.5], [0.5, 0.0]])
    ema_before = ema.clone()
    w, new = gradvac(gram(J), ema, beta=0.1)
    assert torch.equal(ema, ema_before)                  # input state untouched
    a12, a21 = float(w[1]) - 1.0, float(w[0]) - 1.0      # T=2: w = (1 + a21, 1 + a12)
    assert a12 > 0 and a21 > 0
    assert abs(cos(J[0] + a12 * J[1], J[1]) - 0.5) <= 1e-12
    assert abs(cos(J[1] + a21 * J[0], J[0]) - 0.5) <= 1e-12
    expected = 0.9 * 0.5 + 0.1 * (-0.3)
    assert abs(float(new[0, 1]) - expected) <= 1e-12 and abs(float(new[1, 0]) - expected) <= 1e-12
    assert float(new[0, 0]) == 0.0 and float(new[1, 1]) == 0.0
    # above the target: no correction, the EMA still moves
    J = pair_with_cosine(0.6)
    w, new = gradvac(gram(J), ema, beta=0.1)
    assert torch.equal(w, torch.ones(2, dtype=F64))
    assert abs(float(new[0, 1]) - (0.9 * 0.5 + 0.1 * 0.6)) <= 1e-12


def test_gradvac_zero_target_is_pcgrad():
    J = pair_with_cosine(-0.4)
    w, new = gradvac(gram(J), None, beta=0.01)
    assert torch.allclose(w, pcgrad(gram(J)), atol=1e-12)
    assert new.shape == (2, 2) and new.dtype == F64
    assert abs(float(new[0, 1]) - 0.01 * -0.4) <= 1e-12


def gradvac_reference(J, ema, beta, gen):
    """GradVac (Wang et al. 2021, Algorithm 1) directly on the gradients, same permutation draws."""
    T = J.shape[0]
    ema = ema.clone()
    d = torch.zeros(J.shape[1], dtype=F64)
    for i in range(T):
        others = [j for j in range(T) if j != i]
        order = [others[k] for k in torch.randperm(T - 1, generator=gen).tolist()]
        gi = J[i].clone()
        for j in order:
            phi = cos(gi, J[j])
            target = float(ema[i, j])
            if phi < target:
                a = float(gi.norm()) * (target * math.sqrt(1 - phi ** 2)
                                        - phi * math.sqrt(1 - target ** 2)) \
                    / (float(J[j].norm()) * math.sqrt(1 - target ** 2))
                gi = gi + a * J[j]
                assert abs(cos(gi, J[j]) - target) <= 1e-10
            ema[i, j] = (1 - beta) * target + beta * phi
        d += gi
    return d, ema


@pytest.mark.parametrize("T,N", [(3, 5), (4, 6), (5, 10)])
def test_gradvac_matches_direct_implementation_over_steps(T, N):
    ema_mine = ema_ref = None
    for step in range(5):
        J = rand_J(T, N, 100 * T + step)
        if ema_ref is None:
            ema_ref = torch.zeros(T, T, dtype=F64)
        w, ema_mine = gradvac(gram(J), ema_mine, beta=0.3,
                                 generator=torch.Generator().manual_seed(step))
        d_ref, ema_ref = gradvac_reference(J, ema_ref, 0.3, torch.Generator().manual_seed(step))
        assert torch.allclose(agg(J, w), d_ref, atol=1e-10)
        assert torch.allclose(ema_mine, ema_ref, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# cross-checks against TorchJD (optional)
# ----------------------------------------------------------------------------------------------

def _torchjd_aggregation():
    pytest.importorskip("torchjd", reason="torchjd is not installed; cross-checks skipped")
    import torchjd.aggregation as A
    return A


def _make(factory, what):
    try:
        return factory()
    except ImportError as exc:
        pytest.skip(f"TorchJD {what} needs optional dependencies that are not installed: {exc}")


def _quadprog_projector():
    """TorchJD's QuadprogProjector class (torchjd >= 0.18), or skip."""
    try:
        from torchjd.linalg import QuadprogProjector
    except ImportError:
        pytest.skip("this torchjd version has no torchjd.linalg.QuadprogProjector")
    return QuadprogProjector


CROSS = [(3, 5, 0), (4, 8, 1), (5, 12, 2), (2, 4, 3)]


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_upgrad(T, N, seed):
    A = _torchjd_aggregation()
    QuadprogProjector = _quadprog_projector()
    J = rand_J(T, N, seed)
    G = gram(J)
    ref = _make(lambda: A.UPGradWeighting(projector=QuadprogProjector(reg_eps=0.0)), "UPGrad")(G)
    assert torch.allclose(agg(J, upgrad(G, ridge=0.0)), agg(J, ref), atol=1e-9)
    assert torch.allclose(agg(J, upgrad(G)), agg(J, ref), atol=1e-8)
    default = _make(lambda: A.UPGradWeighting(), "UPGrad")(G)     # with its 1e-4 regulariser
    assert torch.allclose(agg(J, upgrad(G)), agg(J, default), atol=1e-2)


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_mgda(T, N, seed):
    A = _torchjd_aggregation()
    J = rand_J(T, N, seed)
    G = gram(J)
    ref = A.MGDAWeighting(epsilon=1e-5, max_iters=250)(G)
    fw = mgda(G, exact=False, tol=1e-5, max_iter=250)
    assert torch.allclose(fw, ref, atol=1e-12)            # the same Frank–Wolfe iterates
    ex = mgda(G)
    assert float(ex @ G @ ex) <= float(ref @ G @ ref) + 1e-14


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_pcgrad(T, N, seed):
    A = _torchjd_aggregation()
    J = rand_J(T, N, seed)
    J[-1] = -0.7 * J[0] + 0.5 * J[-1]
    G = gram(J)
    torch.manual_seed(seed)
    ref = A.PCGradWeighting()(G)
    assert torch.allclose(pcgrad(G, generator=torch.Generator().manual_seed(seed)), ref,
                          atol=1e-12)


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_imtl_g_and_aligned_mtl(T, N, seed):
    A = _torchjd_aggregation()
    G = gram(rand_J(T, N, seed))
    assert torch.allclose(imtl_g(G), A.IMTLGWeighting()(G), atol=1e-9)
    assert torch.allclose(aligned_mtl(G), A.AlignedMTLWeighting()(G), atol=1e-9)


@pytest.mark.parametrize("T,N", [(2, 4), (3, 5), (4, 8)])
def test_torchjd_gradvac(T, N):
    A = _torchjd_aggregation()
    ref = A.GradVacWeighting(beta=0.3, eps=0.0)
    ema = None
    for step in range(4):
        G = gram(rand_J(T, N, 10 * T + step))
        torch.manual_seed(step)
        w_ref = ref(G)
        w, ema = gradvac(G, ema, beta=0.3, generator=torch.Generator().manual_seed(step))
        assert torch.allclose(w, w_ref, atol=1e-9)


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_cagrad(T, N, seed):
    A = _torchjd_aggregation()
    J = rand_J(T, N, seed)
    G = gram(J)
    ref = _make(lambda: A.CAGradWeighting(c=0.4, norm_eps=0.0), "CAGrad")(G)
    d, d_ref = agg(J, cagrad(G, c=0.4)), agg(J, ref)
    # TorchJD solves the inner problem with a generic conic solver (about 1e-4 accurate here);
    # ours is certified optimal (primal = dual above), so it is at least as good and close.
    assert torch.allclose(d, d_ref, atol=1e-3 * float(d.norm()))
    assert float((J @ d).min()) >= float((J @ d_ref).min()) - 1e-12


@pytest.mark.parametrize("T,N,seed", CROSS)
def test_torchjd_nash_mtl(T, N, seed):
    A = _torchjd_aggregation()
    J = rand_J(T, N, seed)
    nash = _make(lambda: A.NashMTL(n_tasks=T, max_norm=0.0), "NashMTL")
    d_ref = nash(J).to(F64)
    # TorchJD (like the official code) stops its 20-step convex-approximation loop once
    # ||Gα − 1/α|| < 1e-3 on the Frobenius-normalised Gramian: agreement to about 1e-3.
    d = agg(J, nash_mtl(gram(J)))
    assert torch.allclose(d, d_ref, atol=1e-2 * float(d.norm()))


@pytest.mark.parametrize("method", ["mgda", "cagrad"])
def test_absent_tasks_are_left_out_of_mgda_and_cagrad(method):
    """A task with no labelled row in the batch (loss 0) has a zero gradient, which would put 0 in MGDA's convex
    hull and make CAGrad's optimum 0 (no step): both give it weight 0 and solve the other tasks alone."""
    from mtlvision.balancing import build_balancer
    from mtlvision.balancing.gradient import TaskGradients
    from mtlvision.tasks import Task

    J = torch.tensor([[1.0, 0.2, 0.0], [0.0, 0.0, 0.0], [-0.3, 1.0, 0.5]], dtype=torch.float64)
    tasks = [Task(n, ["x", "y"]) for n in "abc"]
    balancer = build_balancer({"method": method}, tasks)
    combine = lambda J, losses: balancer.combine(TaskGradients(J, J @ J.T, losses), None)  # noqa: E731
    full = combine(J, torch.tensor([0.7, 0.0, 0.4], dtype=torch.float64))
    alone = combine(J[[0, 2]], torch.tensor([0.7, 0.4], dtype=torch.float64))
    assert full.weights[1] == 0 and torch.allclose(full.weights[[0, 2]], alone.weights)
    assert full.update.norm() > 0.1  # kept in, the zero row would make the update 0
    present = combine(J, torch.tensor([0.7, 0.1, 0.4], dtype=torch.float64))  # present, zero gradient: the paper
    assert present.update.norm() < 1e-9 if method == "mgda" else True
