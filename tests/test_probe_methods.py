"""Known values of the methods that probe (SDMGrad, MoDo: extra batches; Auto-Lambda: a look-ahead) and of NTKMTL:
hand-computed cases, the papers' updates recomputed here, TorchJD 0.18 where it has the method."""
from __future__ import annotations

import copy

import pytest
import torch

from balancing_harness import TASKS, Net, Run, batch, losses_of, make
from mtlvision.balancing import METHODS, StepContext, build_balancer
from mtlvision.balancing.double_sampling import project_simplex
from mtlvision.balancing.methods.auto_lambda import AutoLambda, adam_step
from mtlvision.balancing.methods.modo import modo_step
from mtlvision.balancing.methods.ntkmtl import ntkmtl
from mtlvision.balancing.methods.sdmgrad import sdmgrad_step
from mtlvision.errors import ConfigError, MTLVisionError

F64 = torch.float64
torchjd = pytest.importorskip("torchjd.aggregation")


def _random_A(g: torch.Generator, T: int = 4) -> torch.Tensor:
    """J₁J₂ᵀ of two correlated random Jacobians (mean diagonal of order 1)."""
    base = torch.randn(T, 7, generator=g, dtype=F64)
    return (base + 0.3 * torch.randn(T, 7, generator=g, dtype=F64)) @ (base + 0.3 * torch.randn(T, 7, generator=g,
                                                                                                dtype=F64)).T / 7


# -- the simplex projection ---------------------------------------------------------------------------

def test_simplex_projection_known_values_and_optimality():
    assert project_simplex(torch.tensor([0.35, 0.125], dtype=F64)).tolist() == pytest.approx([0.6125, 0.3875], abs=1e-15)
    assert project_simplex(torch.tensor([2.0, 0.0, -1.0])).tolist() == [1.0, 0.0, 0.0]
    assert project_simplex(torch.tensor([0.2, 0.3, 0.5], dtype=F64)).tolist() == pytest.approx([0.2, 0.3, 0.5], abs=1e-15)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = 3 * torch.randn(6, generator=g, dtype=F64)
        p = project_simplex(v)
        assert p.min() >= 0 and float(p.sum()) == pytest.approx(1.0, abs=1e-14)
        # optimality (KKT): v - p = θ on the support and <= θ off it
        theta = (v - p)[p > 0]
        assert float(theta.max() - theta.min()) < 1e-13 and bool(((v - p)[p == 0] <= theta.max() + 1e-13).all())
    with pytest.raises(ValueError, match="NaN"):
        project_simplex(torch.tensor([0.5, float("nan")]))


# -- SDMGrad ------------------------------------------------------------------------------------------

def test_sdmgrad_one_step_by_hand():
    """A = [[1, -.5], [.25, 1]] (s = 1), λ = .5, β = .4, μ = 0, w₀ = ω = (.5, .5): A(w₀ + λω) = (.375, .9375),
    w₀ − β·that = (.35, .125) → projection (.6125, .3875) → weights ((.6125, .3875) + .25)/1.5 = (.575, .425)."""
    A = torch.tensor([[1.0, -0.5], [0.25, 1.0]], dtype=F64)
    w, weights = sdmgrad_step(A, None, lam=0.5, lr=0.4, momentum=0.0, steps=1)
    assert w.tolist() == pytest.approx([0.6125, 0.3875], abs=1e-15)
    assert weights.tolist() == pytest.approx([0.575, 0.425], abs=1e-15)


def test_sdmgrad_is_the_papers_projected_sgd_and_torchjds_weighting():
    """Several training steps (w warm-started): the paper's Algorithm 1 inner loop written out here (μ = 0, a
    plain loop, projection by bisection on θ), and TorchJD's SDMGradWeighting with momentum (1e-6)."""
    def bisect_projection(v):
        lo, hi = float(v.min()) - 1, float(v.max())
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if float((v - mid).clamp(min=0).sum()) > 1 else (lo, mid)
        return (v - lo).clamp(min=0)

    g = torch.Generator().manual_seed(1)
    for momentum in (0.0, 0.5):
        oracle = torchjd.SDMGradWeighting(lr=10.0, momentum=momentum, n_iter=20, lambda_=0.3)
        w = paper_w = None
        worst = 0.0
        for _ in range(5):
            A = _random_A(g)
            w, weights = sdmgrad_step(A, w, lam=0.3, lr=10.0, momentum=momentum, steps=20)
            worst = max(worst, float((weights - oracle(A)).abs().max()))
            if momentum == 0.0:
                T = len(A)
                omega = torch.full((T,), 1.0 / T, dtype=F64)
                An = A / A.diagonal().clamp(min=0).sqrt().mean() ** 2
                paper_w = omega if paper_w is None else paper_w
                for _ in range(20):
                    paper_w = bisect_projection(paper_w - 10.0 * An @ (paper_w + 0.3 * omega))
                torch.testing.assert_close(w, paper_w, atol=1e-12, rtol=0)
                torch.testing.assert_close(weights, (paper_w + 0.3 * omega) / 1.3, atol=1e-12, rtol=0)
        assert worst < 1e-6, worst


def _reference_jacobian(model, x, y) -> torch.Tensor:
    losses = losses_of(model(x)[2], y, TASKS, {})
    params = model.shared_parameters()
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t.name], params,
                                                                               retain_graph=True)])
                        for t in TASKS])


@pytest.mark.parametrize("name", ["sdmgrad", "modo"])
def test_double_sampling_end_to_end(name):
    """Through the probe: A from the extra batches 1 and 2, the update on the step's own batch, state carried."""
    run = Run(make(name, "parameter"))
    model = copy.deepcopy(run.model)
    state = None
    for s in range(3):
        step = run.step(0, s)
        J1, J2 = (_reference_jacobian(model, *batch(0, s, extra=k)) for k in (1, 2))
        A = J1 @ J2.T
        if name == "sdmgrad":
            state, expect = sdmgrad_step(A, state)
        else:
            state = expect = modo_step(A, torch.full((3,), 1 / 3, dtype=F64) if state is None else state,
                                      run.balancer.gamma, run.balancer.rho)
        assert list(step.weights.values()) == pytest.approx(expect.tolist(), abs=1e-10)
        J = _reference_jacobian(model, *batch(0, s))
        trunk = torch.cat([step.grads["trunk.weight"].reshape(-1), step.grads["trunk.bias"]])
        torch.testing.assert_close(trunk, expect @ J, atol=1e-12, rtol=1e-10)
    assert getattr(run.balancer, "w" if name == "sdmgrad" else "lam").tolist() == pytest.approx(state.tolist())


# -- MoDo ---------------------------------------------------------------------------------------------

def test_modo_step_by_hand_and_against_torchjd():
    """λ = (.5, .5), A = [[2, 0], [0, 0]], γ = .25: λ − γAλ = (.25, .5) → projection (.375, .625); then a sequence
    of random A against TorchJD's MoDoWeighting (stateful), with and without ρ."""
    lam = modo_step(torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64), torch.tensor([0.5, 0.5], dtype=F64), gamma=0.25)
    assert lam.tolist() == pytest.approx([0.375, 0.625], abs=1e-15)
    g = torch.Generator().manual_seed(2)
    for gamma, rho in ((0.1, 0.1), (0.5, 0.0)):
        oracle = torchjd.MoDoWeighting(gamma=gamma, rho=rho)
        lam = torch.full((4,), 0.25, dtype=F64)
        for _ in range(6):
            A = _random_A(g)
            lam = modo_step(A, lam, gamma, rho)
            assert float((lam - oracle(A)).abs().max()) < 1e-12


# -- NTKMTL -------------------------------------------------------------------------------------------

def test_ntkmtl_by_hand():
    """G = [[1, .5], [.5, 4]]: tr G = 5, w = (√5, √(5/4)); exponent 1: (5, 5/4); a zero task gets 0."""
    G = torch.tensor([[1.0, 0.5], [0.5, 4.0]], dtype=F64)
    assert ntkmtl(G).tolist() == pytest.approx([5 ** 0.5, 1.25 ** 0.5], abs=1e-15)
    assert ntkmtl(G, exponent=1.0).tolist() == pytest.approx([5.0, 1.25], abs=1e-15)
    G3 = torch.zeros(3, 3, dtype=F64)
    G3[:2, :2] = G
    assert ntkmtl(G3).tolist() == pytest.approx([5 ** 0.5, 1.25 ** 0.5, 0.0], abs=1e-15)
    assert ntkmtl(torch.zeros(2, 2)).tolist() == [0.0, 0.0]


def test_ntkmtl_update_is_sqrt_trace_times_sum_of_unit_gradients_and_scale_free_in_direction():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(4, 9, generator=g, dtype=F64)
    d = ntkmtl(J @ J.T) @ J
    expect = (J ** 2).sum().sqrt() * (J / J.norm(dim=1, keepdim=True)).sum(0)
    torch.testing.assert_close(d, expect, atol=1e-13, rtol=1e-13)
    J2 = J.clone()
    J2[1] *= 7.0  # one task's loss scaled
    d2 = ntkmtl(J2 @ J2.T) @ J2
    torch.testing.assert_close(d2 / d2.norm(), d / d.norm(), atol=1e-13, rtol=0)


# -- Auto-Lambda --------------------------------------------------------------------------------------

def _lookahead_objective(model: Net, lam: torch.Tensor, alpha: float, primary: list[str]) -> float:
    """L^val(θ − α ∇_θ Σ λ_t L_t^train(θ)) computed directly on a copy of the model (train: the step's batch,
    val: the harness's validation batch 0 of step (0, 0))."""
    m = copy.deepcopy(model)
    losses = losses_of(m(batch(0, 0)[0])[2], batch(0, 0)[1], TASKS, {})
    total = sum(lam[i] * losses[t.name] for i, t in enumerate(TASKS))
    grads = torch.autograd.grad(total, list(m.parameters()))
    with torch.no_grad():
        for p, gr in zip(m.parameters(), grads):
            p -= alpha * gr
        x, y = batch(0, 0, extra=500)
        val = losses_of(m(x)[2], y, TASKS, {})
    return float(sum(val[n] for n in primary))


@pytest.mark.parametrize("primary", [None, ["b"]])
def test_auto_lambda_hypergradient_matches_finite_differences_of_the_lookahead(primary):
    """The method's meta-gradient (the authors' finite-difference Hessian-vector product) against central
    differences in λ of the look-ahead objective computed directly on a tiny model: to 1e-6 relative with a
    small finite-difference radius (the method's own arithmetic), to 1e-3 with the authors' radius 0.01
    (their approximation: a central difference of step 0.01 in parameter norm)."""
    spec = {"method": "auto_lambda", "lookahead_lr": 0.3, **({"primary": primary} if primary else {})}
    balancer = build_balancer(spec, TASKS)
    run = Run(balancer)
    lam = balancer.lam.clone()
    names = primary or [t.name for t in TASKS]
    h = 1e-5
    expect = torch.tensor([(_lookahead_objective(run.model, lam + h * e, 0.3, names)
                            - _lookahead_objective(run.model, lam - h * e, 0.3, names)) / (2 * h)
                           for e in torch.eye(3, dtype=F64)], dtype=F64)
    assert expect.abs().max() > 1e-4  # not trivially zero
    for radius, rtol in ((1e-5, 1e-6), (AutoLambda.fd_radius, 1e-3)):
        balancer.fd_radius = radius
        shared, trunk, losses = run.forward(*batch(0, 0))
        ctx = run.context(shared, trunk, 0, 0, run.probe(0, 0))
        got = balancer.meta_gradient(torch.stack([losses[t.name] for t in TASKS]), ctx)
        torch.testing.assert_close(got, expect, rtol=rtol, atol=rtol * float(expect.abs().max()))
    assert all(p.grad is None for p in run.model.parameters())  # the probes wrote no .grad


def test_auto_lambda_step_is_adam_on_the_meta_gradient_then_the_weighted_sum():
    """λ follows torch.optim.Adam(lr) fed the meta-gradients; the trunk gets ∇Σ λ_t L_t with the new λ."""
    balancer = build_balancer({"method": "auto_lambda", "lr": 0.01}, TASKS)
    run = Run(balancer)
    lam = torch.full((3,), 0.1, dtype=F64, requires_grad=True)
    adam = torch.optim.Adam([lam], lr=0.01)
    for s in range(4):
        x, y = batch(0, s)
        shared, trunk, losses = run.forward(x, y)
        grad = balancer.meta_gradient(torch.stack([losses[t.name] for t in TASKS]),
                                      run.context(shared, trunk, 0, s, run.probe(0, s)))
        lam.grad = grad
        adam.step()
        step = run.step(0, s)
        assert list(step.weights.values()) == pytest.approx(lam.tolist(), rel=1e-12, abs=1e-15)
    one = adam_step(*(torch.zeros(1, dtype=F64) + v for v in (0, 1, 0, 0)), torch.zeros((), dtype=F64), 0.5)
    assert float(one["lam"]) == pytest.approx(-0.5, rel=1e-7)  # first Adam step: lr · g/|g|


# -- configuration errors and the probe requirement ---------------------------------------------------

@pytest.mark.parametrize("name,param,value,match", [
    ("sdmgrad", "lam", -0.1, ">= 0"), ("sdmgrad", "inner_lr", 0.0, "> 0"),
    ("sdmgrad", "inner_momentum", 1.0, r"\[0, 1\)"), ("sdmgrad", "inner_steps", 0, ">= 1"),
    ("modo", "gamma", 0.0, "> 0"), ("modo", "rho", -1.0, ">= 0"),
    ("auto_lambda", "lr", 0.0, "> 0"), ("auto_lambda", "lookahead_lr", -1.0, "> 0"),
    ("auto_lambda", "init", float("inf"), "finite"), ("auto_lambda", "primary", ["zz"], "unknown"),
    ("auto_lambda", "primary", [], "non-empty"), ("ntkmtl", "exponent", -0.5, ">= 0")])
def test_out_of_range_parameters_name_the_key_and_range(name, param, value, match):
    with pytest.raises(ConfigError, match=rf"balancing\.{param}: .*{match}"):
        build_balancer({"method": name, param: value}, TASKS)


@pytest.mark.parametrize("name", ["sdmgrad", "modo", "auto_lambda"])
def test_probing_methods_declare_it_and_refuse_a_context_without_a_probe(name):
    assert METHODS.get(name).factory.needs_probe
    model = Net()
    x, y = batch(0, 0)
    balancer = make(name, "parameter")
    shared, trunk, logits = model(x)
    ctx = StepContext(shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=trunk)
    with pytest.raises(MTLVisionError, match="extra forward passes"):
        balancer.backward(losses_of(logits, y, TASKS, {}), ctx)
    assert not METHODS.get("ntkmtl").factory.needs_probe


def test_double_sampling_methods_work_in_parameter_space_only():
    for name in ("sdmgrad", "modo"):
        assert METHODS.get(name).factory.spaces == ("parameter",)
        with pytest.raises(ConfigError, match="unknown key"):
            build_balancer({"method": name, "space": "feature"}, TASKS)
