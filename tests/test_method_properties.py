"""Properties every registered balancing method must have, and the promises it declares (`Balancer.promises`).

Parametrised over `METHODS.names()` and every space a method supports, on the float64 toy problem of
`balancing_harness.py`: registering a method puts it under every test here. What each method promises
(non-conflicting update, behaviour under task permutation and loss scaling, whether the trunk gets the
gradient of the weighted loss sum) is a class attribute; the tests check exactly the declared promises.
Every method: finite weights, state round trip through a checkpoint, data-parallel equality.
"""
from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from balancing_harness import TASKS, Net, Run, batch, cases, losses_of, make, ranks
from mtlvision.balancing import METHODS, StepContext
from mtlvision.balancing.base import Promises
from mtlvision.balancing.gradient import Combination, GradientMethod, GradientParams, GramianWeighting
from mtlvision.balancing.loss import LossWeighting
from mtlvision.balancing.methods.mgda import mgda
from mtlvision.balancing.spaces import SPACES
from mtlvision.errors import MTLVisionError

CASES = cases()
IDS = [f"{m}-{s}" if s else m for m, s in CASES]


def promised(test):
    """Parametrise over the cases whose method's promises satisfy `test`."""
    picked = [(c, i) for c, i in zip(CASES, IDS) if test(METHODS.get(c[0]).factory.promises)]
    return pytest.mark.parametrize("name,space", [c for c, _ in picked], ids=[i for _, i in picked])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # tiny tensors (conftest restores the count)


def tol(space):
    """Feature-space Jacobians are float32 (they may come from bf16 activations); the rest is float64."""
    return 2e-5 if space == "feature" else 1e-9


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return bool((a - b).abs().max() <= rel * max(float(a.abs().max()), float(b.abs().max()), 1e-300))


def trunk_grad(step) -> torch.Tensor:
    return torch.cat([step.grads["trunk.weight"].reshape(-1), step.grads["trunk.bias"]])


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- the registration contract ----------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS.names())
def test_registration_contract(name):
    """One family hook, declared cost and promises, no override of `backward` or of a private method."""
    entry = METHODS.get(name)
    cls = entry.factory
    assert entry.description and isinstance(cls.cost_class, str) and cls.cost_class
    assert isinstance(cls.promises, Promises)
    family = LossWeighting if issubclass(cls, LossWeighting) else GradientMethod
    assert issubclass(cls, family), f"{name}: derive from LossWeighting or a GradientMethod family"
    assert cls.backward is family.backward, f"{name} overrides backward"
    for klass in cls.__mro__[:cls.__mro__.index(family)]:
        private = [k for k in vars(klass) if k.startswith("_") and not k.startswith("__")]
        assert not private, f"{name}: {klass.__name__} overrides private {private}"
    if family is GradientMethod:
        assert cls.spaces and set(cls.spaces) <= set(SPACES)


def test_readme_table_lists_every_method_with_its_cost_class():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Balancing methods"):]
    section = section[:section.index("\n## ")]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    cost = {r[1].strip().strip("`"): r[-2].strip() for r in rows}
    for name in METHODS.names():
        assert cost.get(name) == METHODS.get(name).factory.cost_class, name


@pytest.mark.parametrize("name,space", CASES, ids=IDS)
def test_steps_are_finite_and_train_the_trunk(name, space):
    for step in Run(make(name, space)).trajectory():
        assert set(step.weights) == {t.name for t in TASKS}
        assert all(torch.isfinite(torch.tensor(v)) for v in step.weights.values())
        assert all(torch.isfinite(g).all() for g in step.grads.values())
        assert trunk_grad(step).abs().sum() > 0


# -- declared promises ------------------------------------------------------------------------------

def reference_jacobian(run: Run, epoch: int, step: int, space: str | None) -> torch.Tensor:
    """J of the step's losses in the method's space (parameter space for loss weighting), computed afresh."""
    x, y = batch(epoch, step)
    shared, _, logits = run.model(x, split=space == "feature")
    losses = losses_of(logits, y, run.tasks, run.scale)
    wrt = [shared] if space == "feature" else run.model.shared_parameters()
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t.name], wrt,
                                                                           retain_graph=True)])
                        for t in run.tasks])


@promised(lambda p: p.weighted_sum)
def test_trunk_receives_the_gradient_of_the_weighted_loss_sum(name, space):
    run = Run(make(name, space))
    steps = run.trajectory()
    for k, step in enumerate(steps):
        epoch, s = divmod(k, 2)
        J = reference_jacobian(run, epoch, s, "parameter")
        w = torch.tensor([step.weights[t.name] for t in TASKS], dtype=torch.float64)
        assert close(trunk_grad(step), w @ J, tol(space)), (name, space, k)


@promised(lambda p: p.non_conflicting)
def test_update_conflicts_with_no_task(name, space):
    run = Run(make(name, space), scale={"a": 10.0})  # a dominant task: the plain sum conflicts with others
    conflicts = 0
    for k, step in enumerate(run.trajectory()):
        epoch, s = divmod(k, 2)
        J = reference_jacobian(run, epoch, s, space)
        w = torch.tensor([step.weights[t.name] for t in TASKS], dtype=torch.float64)
        d = w @ J
        assert (J @ d).min() >= -tol(space) * float(J.norm(dim=1).max() * d.norm()), (name, space, k)
        conflicts += int((J @ J.sum(0)).min() < 0)
    assert conflicts, "no step of the problem has a conflicting plain sum: the test would prove nothing"


@pytest.mark.parametrize("name,space", CASES, ids=IDS)
def test_task_permutation(name, space):
    promise = METHODS.get(name).factory.promises.permutation
    tasks = TASKS[:2] if promise == "random_order" else TASKS  # two tasks: the random orders are trivial
    order = list(reversed(tasks)) if len(tasks) == 2 else [tasks[2], tasks[0], tasks[1]]
    base = Run(make(name, space, tasks), Net(tasks), tasks).trajectory()
    perm = Run(make(name, space, order), Net(tasks), order).trajectory()
    for a, b in zip(base, perm):
        if promise == "positional":  # the draws attach to positions
            assert list(a.weights.values()) == list(b.weights.values())
            continue
        for t in tasks:
            assert b.weights[t.name] == pytest.approx(a.weights[t.name], rel=tol(space), abs=1e-12)
        assert close(trunk_grad(a), trunk_grad(b), tol(space))


@pytest.mark.parametrize("factor", [10.0, 0.1])
@promised(lambda p: p.scaling != "none")
def test_scaling_one_task_loss(name, space, factor):
    promise = METHODS.get(name).factory.promises.scaling
    base = Run(make(name, space)).trajectory()
    scaled = Run(make(name, space), scale={"b": factor}).trajectory()
    for a, b in zip(base, scaled):
        ga, gb = trunk_grad(a), trunk_grad(b)
        if promise == "weights":
            assert b.weights == pytest.approx(a.weights, rel=tol(space), abs=1e-12)
        elif promise == "update":  # up to the methods' 1e-8 in log(L + eps), L + eps
            assert close(ga, gb, max(10 * tol(space), 1e-6))
        else:  # direction: the same update up to a positive factor; line: up to a non-zero factor
            sign = 1.0 if promise == "direction" else float(torch.sign(ga @ gb))
            assert close(ga / ga.norm(), sign * gb / gb.norm(), max(10 * tol(space), 1e-6))


# -- every method -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,space", CASES, ids=IDS)
def test_state_round_trip_continues_identically(name, space):
    """state_dict + extra_state through a checkpoint: a fresh instance (other torch seed) continues the run."""
    straight = Run(make(name, space), learn=0.1)
    straight.trajectory(epochs=2)
    ckpt = roundtrip({"balancer": straight.balancer.state_dict(), "extra": straight.balancer.extra_state()})
    fresh = make(name, space, seed=999)
    fresh.load_state_dict(ckpt["balancer"])
    fresh.load_extra_state(ckpt["extra"])
    resumed = Run(fresh, learn=0.1)
    for epoch in (2, 3):
        for a, b in zip(straight.epoch(epoch, 2), resumed.epoch(epoch, 2)):
            assert a.weights == b.weights
            assert all(torch.equal(a.grads[n], b.grads[n]) for n in a.grads)
    for k, v in straight.balancer.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


@pytest.mark.parametrize("name,space", CASES, ids=IDS)
def test_data_parallel_ranks_agree_and_equal_one_process(name, space):
    """Two ranks with half the rows each: the same weights on both, equal to one process on the whole batch."""
    r0, r1 = ranks(name, space)
    single = Run(make(name, space)).trajectory()
    for a, b, ref in zip(r0, r1, single):
        assert a.weights == b.weights
        assert all(torch.equal(a.grads[n], b.grads[n]) for n in a.grads)
        for t in TASKS:
            assert a.weights[t.name] == pytest.approx(ref.weights[t.name], rel=10 * tol(space), abs=1e-12)
        for n in ref.grads:
            assert close(a.grads[n], ref.grads[n], 10 * tol(space)), n


# -- Gramian weightings: the solver conventions -------------------------------------------------------

GRAMIAN = [n for n in METHODS.names() if issubclass(METHODS.get(n).factory, GramianWeighting)]


@pytest.mark.parametrize("name", GRAMIAN)
def test_gramian_dtype_shape_and_validation(name):
    """w keeps G's dtype; T = 1 works; a non-square or non-finite G is a ValueError (solvers.py conventions)."""
    ctx = StepContext(torch.zeros(1), [], [], 0, 0)
    g = torch.Generator().manual_seed(0)
    J = torch.randn(3, 5, generator=g, dtype=torch.float64)
    J[1] = -0.8 * J[0] + 0.6 * J[1]
    w, _ = make(name, None if name == "graddrop" else "feature").step((J @ J.T).float(), ctx)
    assert w.shape == (3,) and w.dtype == torch.float32 and torch.isfinite(w).all()
    assert make(name, "feature", TASKS[:1]).step(torch.ones(1, 1), ctx)[0].shape == (1,)
    two = make(name, "feature", TASKS[:2])
    with pytest.raises(ValueError):
        two.step(torch.ones(2, 3), ctx)
    with pytest.raises(ValueError):
        two.step(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]), ctx)


# -- the probe seam (extra batches, shifted parameters) ------------------------------------------------

class _OtherBatchMGDA(GradientMethod):
    """A test-only method in the style of MoDo/SDMGrad: weights from another batch's Gramian."""

    def combine(self, grads, ctx):
        probe = ctx.run_probe("train", 1)
        space = self.gradient_space
        other = space.jacobian([probe.losses[n] for n in self.task_names], probe.ctx)
        w = mgda(space.gramian(other.matrix, probe.ctx)).to(grads.matrix.dtype)
        self.probed = other.matrix
        return Combination(w @ grads.matrix, w)


@pytest.mark.parametrize("space", ["feature", "parameter"])
def test_a_method_can_use_another_batch_through_the_probe(space):
    run = Run(_OtherBatchMGDA(GradientParams(space=space), TASKS))
    step = run.step(0, 0)
    x, y = batch(0, 0, extra=1)
    shared, _, logits = run.model(x, split=space == "feature")
    losses = losses_of(logits, y, TASKS, {})
    wrt = [shared] if space == "feature" else run.model.shared_parameters()
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[t.name], wrt, retain_graph=True)])
                     for t in TASKS])
    assert close(run.balancer.probed.double(), J, tol(space))
    w = mgda(J @ J.T)
    assert list(step.weights.values()) == pytest.approx(w.tolist(), rel=1e-4)
    J0 = reference_jacobian(run, 0, 0, "parameter")
    assert close(trunk_grad(step), torch.tensor(list(step.weights.values()), dtype=torch.float64) @ J0, tol(space))


def test_probe_shifts_parameters_without_touching_them():
    run = Run(make("equal", None))
    probe = run.probe(0, 0)
    delta = torch.full_like(run.model.trunk.bias, 0.1)
    before = run.model.trunk.bias.detach().clone()
    shifted = probe("train", 0, {run.model.trunk.bias: delta}).losses
    assert torch.equal(run.model.trunk.bias, before)
    with torch.no_grad():
        run.model.trunk.bias += delta
    x, y = batch(0, 0, extra=0)
    expect = losses_of(run.model(x)[2], y, TASKS, {})
    assert all(float(shifted[n]) == pytest.approx(float(expect[n]), rel=1e-12) for n in expect)


def test_a_missing_probe_is_an_error():
    with pytest.raises(MTLVisionError, match="extra forward passes"):
        StepContext(torch.zeros(1), [], [], 0, 0).run_probe()
