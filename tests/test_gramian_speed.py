"""The Gramian solvers made fast for many tasks return the weights of the solvers they replaced
(`gramian_reference.py`, kept verbatim from before) to 1e-10 relative, on well-conditioned, low-rank,
near-singular and Pareto-stationary Gramians up to T = 50, in float32 and float64; and the exact NNLS
(`nnls_gram`, `nnls_gram_many`) agrees with Lawson–Hanson and raises instead of falling back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gramian_reference as ref
from mtlvision.balancing import solvers
from mtlvision.balancing.methods.cagrad import cagrad
from mtlvision.balancing.methods.gradvac import gradvac
from mtlvision.balancing.methods.mgda import mgda
from mtlvision.balancing.methods.pcgrad import pcgrad
from mtlvision.balancing.methods.upgrad import upgrad
from mtlvision.balancing.solvers import GramianSolverError, nnls_gram, nnls_gram_many

F64 = torch.float64
KINDS = ["random", "lowrank", "nearsing", "conflict", "scaled"]
SIZES = [2, 3, 7, 20, 50]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def gramian(kind: str, T: int, seed: int = 0, n: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * seed + T)
    if kind == "conflict":  # a regular simplex around 0: Pareto-stationary up to 1e-4
        E = torch.eye(T, dtype=F64) - 1.0 / T
        Q = torch.linalg.qr(torch.randn(n, T, generator=g, dtype=F64)).Q
        J = E @ Q.T + 1e-4 * torch.randn(T, n, generator=g, dtype=F64) / n ** 0.5
    elif kind in ("lowrank", "nearsing"):
        r = max(2, T // 4)
        J = torch.randn(T, r, generator=g, dtype=F64) @ torch.randn(r, n, generator=g, dtype=F64)
        J = J + 1e-3 * torch.randn(T, n, generator=g, dtype=F64)
        if kind == "nearsing" and T >= 4:
            J[1] = -J[0] * (1 + 1e-6)
            J[3] = J[2] + 1e-7 * torch.randn(n, generator=g, dtype=F64)
    else:
        J = torch.randn(T, n, generator=g, dtype=F64) + 0.3 * torch.randn(1, n, generator=g, dtype=F64)
        if kind == "scaled":  # task-gradient norms spread over 1e3
            J = J * torch.logspace(-1.5, 1.5, T, dtype=F64).unsqueeze(1)
    return J @ J.T


def cases():
    return [(k, T, dt) for k in KINDS for T in SIZES for dt in (F64, torch.float32)]


def ids(c):
    return f"{c[0]}-T{c[1]}-{str(c[2]).split('.')[-1]}"


def same(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-10) -> bool:
    a, b = a.double(), b.double()
    return float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-300)


@pytest.mark.parametrize("case", cases(), ids=ids)
def test_upgrad_mgda_cagrad_match_the_previous_solvers(case):
    kind, T, dtype = case
    G = gramian(kind, T).to(dtype)
    w, w_ref = upgrad(G), ref.upgrad(G)
    if kind == "nearsing" and dtype == F64 and T >= 20:
        # cond ~1e12 after the 1e-12 ridge: the NNLS minimisers are only determined to ~cond·eps, and the two
        # exact solvers may stop on different (equally optimal) supports; both are non-conflicting
        assert same(w, w_ref, rel=1e-6)
        scale = float(G.diagonal().max())
        assert float((G @ w).min()) >= -1e-9 * scale and float((G @ w_ref).min()) >= -1e-9 * scale
    else:
        assert same(w, w_ref)
    assert same(upgrad(G, ridge=1e-8), ref.upgrad(G, ridge=1e-8))
    assert same(mgda(G), ref.mgda(G))
    for c, rescale in [(0.4, False), (0.8, True)]:
        assert same(cagrad(G, c, rescale=rescale), ref.cagrad(G, c, rescale=rescale))


@pytest.mark.parametrize("case", cases(), ids=ids)
def test_pcgrad_and_gradvac_match_the_previous_loops(case):
    kind, T, dtype = case
    G = gramian(kind, T).to(dtype)
    for seed in (0, 1):
        assert torch.equal(pcgrad(G, torch.Generator().manual_seed(seed)),
                           ref.pcgrad(G, torch.Generator().manual_seed(seed)))
    ema = torch.rand(T, T, generator=torch.Generator().manual_seed(2), dtype=F64) - 0.3  # some targets > cos
    # ||g_i'||² is now summed in another order (one vectorised dot per step): with a nearly opposite pair
    # the cosines it divides lose the digits the cancellation costs, and so may the EMA
    rel = 1e-8 if kind == "nearsing" else 1e-10
    for beta in (0.0, 0.01, 0.5):
        w, e = gradvac(G, ema, beta, torch.Generator().manual_seed(3))
        w_ref, e_ref = ref.gradvac(G, ema, beta, torch.Generator().manual_seed(3))
        assert same(w, w_ref, rel) and same(e, e_ref, rel) and e.dtype == e_ref.dtype
    w, e = gradvac(G, None, 0.01, torch.Generator().manual_seed(4))
    w_ref, e_ref = ref.gradvac(G, None, 0.01, torch.Generator().manual_seed(4))
    assert same(w, w_ref) and same(e, e_ref)


def test_mgda_skips_frank_wolfe_only_when_the_result_is_the_same():
    """Without the exact solve (or where its duality gap cannot certify it) the FW iterate is what it was."""
    for kind in KINDS:
        G = gramian(kind, 20)
        assert same(mgda(G, exact=False), ref.mgda(G, exact=False), rel=0.0)
        assert same(mgda(G, max_iter=3), ref.mgda(G, max_iter=3))


def kkt(Q, c, x, tol):
    """x >= 0, the dual residual c - Qx at most tol off the support and zero (to rounding) on it."""
    w = c - Q @ x
    rounding = 1e-12 * float((c.abs() + Q.abs() @ x.abs()).max())
    return bool((x >= 0).all() and (w[x == 0] <= tol + rounding).all() and (w[x > 0].abs() <= rounding).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 2, 5, 30])
def test_nnls_matches_lawson_hanson_and_is_optimal(kind, T):
    G = gramian(kind, T, seed=5)
    Q = G / solvers.mean_diag(G) + 1e-9 * torch.eye(T, dtype=F64)
    C = torch.randn(6, T, generator=torch.Generator().manual_seed(6), dtype=F64)
    X = nnls_gram_many(Q, C, 1e-13, 50 * T + 50, "test")
    for k in range(len(C)):
        lh = torch.from_numpy(solvers._lawson_hanson(Q.numpy(), C[k].numpy(), 1e-13, 50 * T + 50, "test"))
        old = ref.nnls_gram(Q, C[k], 1e-13, 50 * T + 50, "test")
        assert same(X[k], old, rel=1e-9) and same(lh, old, rel=1e-9)  # LH ported to numpy: same steps
        assert kkt(Q, C[k], X[k], 1e-13)
        single = nnls_gram(Q, C[k], 1e-13, 50 * T + 50, "test")  # polished: Lawson–Hanson's final solve
        assert torch.equal(single, nnls_gram_many(Q, C[k:k + 1], 1e-13, 50 * T + 50, "test", polish=True)[0])
        if torch.equal(single > 0, old > 0):
            assert torch.equal(single, old)


def test_nnls_warm_start_gives_the_same_solution():
    G = gramian("random", 25, seed=7)
    Q = G / solvers.mean_diag(G)
    c = torch.randn(25, generator=torch.Generator().manual_seed(8), dtype=F64)
    x = nnls_gram(Q, c, 1e-13, 2000, "test")
    for free in (x > 0, torch.ones(25, dtype=torch.bool), torch.zeros(25, dtype=torch.bool), ~(x > 0)):
        assert same(nnls_gram(Q, c, 1e-13, 2000, "test", free=free), x, rel=1e-12)


def test_unsolved_problems_go_to_lawson_hanson_which_raises_past_its_budget(monkeypatch):
    """No silent fallback: if the primal-dual steps do not converge, Lawson–Hanson solves the same problem
    exactly, and past its iteration budget that is a GramianSolverError."""
    G = gramian("conflict", 12, seed=9)
    Q = G / solvers.mean_diag(G)
    c = -Q[:, 0].clone()
    expect = nnls_gram(Q, c, 1e-13, 1000, "test")
    monkeypatch.setattr(solvers, "_primal_dual",
                        lambda Q, C, tol, free, steps: (np.zeros(C.shape), np.zeros(len(C), dtype=bool), free))
    assert same(nnls_gram(Q, c, 1e-13, 1000, "test"), expect, rel=1e-9)
    with pytest.raises(GramianSolverError, match="did not terminate"):
        nnls_gram(Q, c, 1e-13, 2, "test")


def test_benchmark_smoke(capsys):
    """benchmarks/gramian_solvers.py --smoke runs every Gramian method and prints its JSON."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gramian_solvers.py"
    spec = importlib.util.spec_from_file_location("gramian_solvers_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--json", "--kinds", "lowrank", "conflict"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert {r["method"] for r in rows} == set(bench.gramian_methods())
    assert all(r["ms"] is not None and r["finite"] for r in rows)
