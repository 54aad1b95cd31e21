"""Mixture-of-experts architectures (MMoE, CGC, PLE, DSelect-k): shapes, sizes, gates, the trunk cut, training."""
import io
import json

import pytest
import torch

from mtlvision.balancing import METHODS, StepContext, build_balancer
from mtlvision.config import ModelConfig, load_config
from mtlvision.errors import ConfigError
from mtlvision.models import build_model
from mtlvision.models.architectures.moe import DSelectKGate, smooth_step
from mtlvision.tasks import Task
from mtlvision.training.optim import build_optimizer
from mtlvision.training import train

from conftest import tiny_config
from probing import model_probe

TASKS = [Task("a", ["0", "1", "2"]), Task("b", ["x", "y"]), Task("c", ["p", "q", "r", "s"])]
BACKBONE = {"name": "smallcnn", "width": 4, "out_dim": 16}  # stages 3->4, 4->8, 8->16 channels; D = 16
ARCHS = [{"name": "mmoe", "experts": 3}, {"name": "cgc"}, {"name": "ple"},
         {"name": "dselect-k", "experts": 4, "k": 2}]
IDS = [a["name"] for a in ARCHS]


def _model(arch, seed=0, backbone=BACKBONE):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone=backbone, architecture=arch), TASKS, (16, 16, 3))


def _batch(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, {t.name: torch.randint(0, t.num_classes, (n,), generator=g) for t in TASKS}


@pytest.mark.parametrize("arch,shared_shapes", [
    (ARCHS[0], [(6, 8), (6, 3, 16)]),  # (GAP of the bottom, 3 expert outputs)
    (ARCHS[1], [(6, 8, 8, 8), (6, 2, 16)]),  # (bottom map, 2 shared-expert outputs)
    (ARCHS[2], [(6, 8, 8, 8)] * 3 + [(6, 2, 16)]),  # (each task's input to level 2, level-2 shared experts)
    (ARCHS[3], [(6, 8), (6, 4, 16)]),
], ids=IDS)
def test_forward_shapes(arch, shared_shapes):
    x, _ = _batch()
    out = _model(arch)(x)
    assert {k: tuple(v.shape) for k, v in out.logits.items()} == {"a": (6, 3), "b": (6, 2), "c": (6, 4)}
    assert [tuple(s.shape) for s in out.shared] == shared_shapes
    assert [tuple(s.shape) for s in out.trunk] == shared_shapes


# smallcnn width 4, out_dim 16, 3 input channels: a stage is conv-BN-ReLU-conv-BN-ReLU (no conv bias)
STAGE = [3 * 4 * 9 + 8 + 4 * 4 * 9 + 8, 4 * 8 * 9 + 16 + 8 * 8 * 9 + 16, 8 * 16 * 9 + 32 + 16 * 16 * 9 + 32]
POOL = 16 * 9 * 16 + 16  # Linear(16 channels x 3x3 grid -> 16)
HEADS = (16 * 3 + 3) + (16 * 2 + 2) + (16 * 4 + 4)
TOP = STAGE[2] + POOL  # one expert: the last stage + pool


@pytest.mark.parametrize("arch,shared,task", [
    # bottom = stages 0-1; 3 experts; gates Linear(8 -> 3) without bias, one per task
    (ARCHS[0], STAGE[0] + STAGE[1] + 3 * TOP, 3 * 8 * 3 + HEADS),
    # + 2 shared experts in the trunk; 1 expert per task and gates Linear(8 -> 1 + 2) downstream
    (ARCHS[1], STAGE[0] + STAGE[1] + 2 * TOP, 3 * TOP + 3 * 8 * 3 + HEADS),
    # bottom = stage 0; level 1 (trunk): 3 + 2 copies of stage 1, task gates Linear(4 -> 3), shared gate
    # Linear(4 -> 5); level 2: 2 shared experts in the trunk, 3 task experts and gates Linear(8 -> 3) downstream
    (ARCHS[2], STAGE[0] + 5 * STAGE[1] + 3 * 4 * 3 + 4 * 5 + 2 * TOP, 3 * TOP + 3 * 8 * 3 + HEADS),
    # 4 experts; per task z: Linear(8 -> k*log2(4) = 4) and alpha: Linear(8 -> 2), both with bias
    (ARCHS[3], STAGE[0] + STAGE[1] + 4 * TOP, 3 * ((8 * 4 + 4) + (8 * 2 + 2)) + HEADS),
], ids=IDS)
def test_parameter_counts_match_hand_calculation(arch, shared, task):
    model = _model(arch)
    assert sum(p.numel() for p in model.shared_parameters()) == shared
    assert sum(p.numel() for p in model.task_parameters()) == task
    assert sum(p.numel() for p in model.parameters()) == shared + task


@pytest.mark.parametrize("arch", ARCHS + [{"name": "ple", "levels": 3, "task_experts": 2, "shared_experts": 1}],
                         ids=IDS + ["ple-3-levels-resnet"])
def test_every_gate_sums_to_one(arch):
    backbone = {"name": "resnet18", "width": 0.0625} if arch.get("levels") == 3 else BACKBONE
    model = _model(arch, backbone=backbone)
    x, _ = _batch()
    gates = model.gate_weights(x)
    names = {"a", "b", "c"}
    if arch["name"] == "ple":
        names |= {f"level{j}/{n}" for j in range(1, arch.get("levels", 2)) for n in ["a", "b", "c", "(shared)"]}
    assert set(gates) == names
    for name, w in gates.items():
        assert (w >= 0).all(), name
        torch.testing.assert_close(w.sum(-1), torch.ones(len(x)), msg=name)


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_gate_weights_leave_the_model_as_it_was(arch):
    """A diagnostic in train mode: no BatchNorm running statistics move, every module keeps its mode, and the
    weights are those of an eval-mode forward pass."""
    model = _model(arch)
    x, _ = _batch()
    model.backbone.stages[0][1].eval()  # a module in another mode than the model's keeps it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gates = model.gate_weights(x)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.training and model.heads[0].training and not model.backbone.stages[0][1].training
    model.eval()
    with torch.no_grad():
        expect = model._run(x)[1]
    assert set(gates) == set(expect)
    for name, w in gates.items():
        torch.testing.assert_close(w, expect[name])


def test_experts_are_independently_initialised():
    model = _model(ARCHS[0])
    first = [p.detach() for p in model.experts[0].parameters() if p.ndim > 1]
    for expert in model.experts[1:]:
        assert all(not torch.equal(a, b) for a, b in zip(first, (p for p in expert.parameters() if p.ndim > 1)))


def test_dselect_k_selects_at_most_k_experts_once_converged():
    """Toy problem: the target mixes experts 2 and 5 of 8; train the gate until every smooth-step output is 0 or 1."""
    torch.manual_seed(0)
    n, k, batch = 8, 2, 64
    gate = DSelectKGate(6, n, k, gamma=1.0, entropy_reg=0.01)
    x, experts = torch.rand(batch, 6), torch.randn(batch, n, 5)
    target = 0.5 * experts[:, 2] + 0.5 * experts[:, 5]
    assert ((gate(x) > 0).sum(-1) == n).all()  # at initialisation every expert has weight
    opt = torch.optim.Adam(gate.parameters(), lr=0.05)
    for _ in range(300):
        r = gate.selectors(x)
        if ((r == 0) | (r == 1)).all():
            break
        loss = ((torch.einsum("bn,bnd->bd", gate(x), experts) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    r = gate.selectors(x)
    assert ((r == 0) | (r == 1)).all(), "selectors did not saturate"
    w = gate(x)
    assert ((w > 0).sum(-1) <= k).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(batch))
    assert set(w.nonzero()[:, 1].tolist()) == {2, 5}


def test_entropy_regulariser_reaches_only_the_gate_parameters():
    """Its gradient is that of λ·mean_b Σ_i H(r_i) w.r.t. the gate's parameters; the gate input's is untouched."""
    torch.manual_seed(0)
    plain = DSelectKGate(6, 4, 2, gamma=1.0)
    reg = DSelectKGate(6, 4, 2, gamma=1.0, entropy_reg=0.1)
    reg.load_state_dict(plain.state_dict())
    x = torch.rand(10, 6) * 20  # spread the logits over the smooth-step's cubic region
    grads = []
    for gate in (plain, reg):
        xi = x.clone().requires_grad_()
        torch.autograd.backward(gate(xi)[:, 1].sum())
        grads.append((xi.grad, gate.z.weight.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0])
    r = plain.selectors(x)
    penalty = -0.1 * (r * torch.log(r + 1e-6)).sum((1, 2)).mean()
    (expect,) = torch.autograd.grad(penalty, plain.z.weight)
    assert expect.abs().sum() > 0
    torch.testing.assert_close(grads[1][1], grads[0][1] + expect)
    reg.eval()
    torch.testing.assert_close(reg(x), plain(x))


def test_smooth_step_is_the_papers():
    """S(t) = 0 / 1 outside [-γ/2, γ/2], -2t³/γ³ + 3t/(2γ) + 1/2 inside: continuous, flat at both ends, S(0) = 1/2."""
    gamma = 2.0
    t = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0], requires_grad=True)
    s = smooth_step(t, gamma)
    torch.testing.assert_close(s.detach(), torch.tensor([0.0, 0.0, 0.15625, 0.5, 0.84375, 1.0, 1.0]))
    (grad,) = torch.autograd.grad(s.sum(), t)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 0.5625, 0.75, 0.5625, 0.0, 0.0]))


@pytest.mark.parametrize("method", METHODS.names())
def test_entropy_regulariser_is_applied_once_per_step(method):
    """Whatever the balancing method (one backward, or one autograd.grad per task, in feature or parameter
    space), each gate's parameters get ∇(λ mean_b Σ_i H) exactly once, and the trunk's gradients do not change."""
    x, y = _batch(5)
    x = x * 3
    models = []
    for reg in (0.0, 0.1):
        model = _model({"name": "dselect-k", "entropy_reg": reg})
        balancer = build_balancer({"method": method}, TASKS)
        split = getattr(balancer, "needs_shared_features", False)
        out = model(x, split=split)
        losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
        probe = model_probe(model, x, y, TASKS, split) if balancer.needs_probe else None
        balancer.backward(losses, StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0,
                                              trunk=out.trunk, probe=probe))
        models.append((model, out))
    (plain, out), (reg, _) = models
    for p, q in zip(plain.shared_parameters(), reg.shared_parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    for gate_plain, gate_reg in zip(plain.gates, reg.gates):
        r = gate_plain.selectors(out.shared[0].detach())
        penalty = -0.1 * (r * torch.log(r + 1e-6)).sum((1, 2)).mean()
        expect = torch.autograd.grad(penalty, [gate_plain.z.weight, gate_plain.z.bias])
        assert expect[0].abs().sum() > 0
        for p, q, e in zip([gate_plain.z.weight, gate_plain.z.bias], [gate_reg.z.weight, gate_reg.z.bias], expect):
            torch.testing.assert_close(q.grad - p.grad, e, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_feature_space_mgda_gives_the_gradient_of_the_weighted_loss(arch):
    """With the graph split at the shared tensors, trunk gradients are those of Σ w_t L_t and task-specific
    gradients those of Σ_t L_t."""
    x, y = _batch(1)
    model = _model(arch, seed=1)
    out = model(x, split=True)
    losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=out.trunk)
    w = build_balancer({"method": "mgda"}, TASKS).backward(losses, ctx)
    assert abs(sum(w.values()) - 1) < 1e-5
    got_shared = [p.grad.clone() for p in model.shared_parameters()]
    got_task = [p.grad.clone() for p in model.task_parameters()]

    out = model(x, split=False)
    losses = {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}
    expect_shared = torch.autograd.grad(sum(w[n] * loss for n, loss in losses.items()), model.shared_parameters(),
                                        retain_graph=True)
    expect_task = torch.autograd.grad(sum(losses.values()), model.task_parameters())
    for got, expect in zip(got_shared + got_task, list(expect_shared) + list(expect_task)):
        torch.testing.assert_close(got, expect, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_shared_parameters_are_exactly_those_upstream_of_the_cut(arch):
    x, _ = _batch(2)
    model = _model(arch, seed=2)
    out = model(x, split=True)
    shared, task = model.shared_parameters(), model.task_parameters()
    upstream = torch.autograd.grad(sum(t.sum() for t in out.trunk), shared + task, allow_unused=True,
                                   retain_graph=True)
    assert all(g is not None for g in upstream[:len(shared)])
    assert all(g is None for g in upstream[len(shared):])
    downstream = torch.autograd.grad(sum(v.sum() for v in out.logits.values()), shared + task, allow_unused=True)
    assert all(g is None for g in downstream[:len(shared)])
    assert all(g is not None for g in downstream[len(shared):])


@pytest.mark.parametrize("arch", ARCHS, ids=IDS)
def test_state_dict_round_trip(arch):
    x, _ = _batch(3)
    source, target = _model(arch, seed=3), _model(arch, seed=4)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer, weights_only=True))
    source.eval()
    target.eval()
    for name, logits in source(x).logits.items():
        torch.testing.assert_close(target(x).logits[name], logits)


def test_gates_are_not_weight_decayed():
    from mtlvision.config import TrainConfig

    for arch in ARCHS:
        model = _model(arch)
        names = dict(model.named_parameters())
        assert model.no_weight_decay and model.no_weight_decay <= set(names)
        decayed = {id(p) for p in build_optimizer(TrainConfig(), model, []).param_groups[0]["params"]}
        assert all(id(names[n]) not in decayed for n in model.no_weight_decay)


@pytest.mark.parametrize("arch,key", [
    ({"name": "mmoe", "split": 3}, "model.architecture.split"),  # smallcnn has 3 stages
    ({"name": "mmoe", "split": -1}, "model.architecture.split"),
    ({"name": "mmoe", "split": 0}, "model.architecture.split"),  # smallcnn's stem has no parameters
    ({"name": "mmoe", "experts": 0}, "model.architecture.experts"),
    ({"name": "mmoe", "expert": 2}, "model.architecture: unknown key(s) expert"),
    ({"name": "cgc", "shared_experts": 0}, "model.architecture.shared_experts"),
    ({"name": "cgc", "task_experts": 0}, "model.architecture.task_experts"),
    ({"name": "ple", "levels": 4}, "model.architecture.levels"),
    ({"name": "ple", "levels": 2, "split": 2}, "model.architecture.levels"),
    ({"name": "ple", "levels": 0}, "model.architecture.levels"),
    ({"name": "dselect-k", "experts": 6}, "model.architecture.experts"),
    ({"name": "dselect-k", "experts": 4, "k": 5}, "model.architecture.k"),
    ({"name": "dselect-k", "gamma": 0.0}, "model.architecture.gamma"),
    ({"name": "dselect-k", "entropy_reg": -1.0}, "model.architecture.entropy_reg"),
])
def test_config_errors_name_the_key(arch, key):
    with pytest.raises(ConfigError) as err:
        _model(arch)
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("method", ["equal", "pcgrad", "mgda"])
@pytest.mark.parametrize("arch", ARCHS + [dict(ARCHS[3], entropy_reg=0.01)], ids=IDS + ["dselect-k-entropy"])
def test_trains_on_shapes(tmp_path, arch, method):
    cfg = tiny_config(data__source={"name": "shapes", "n_train": 320, "n_test": 32, "size": 16},
                      data__batch_size=32, model__backbone=BACKBONE, model__architecture=arch,
                      balancing={"method": method}, train__epochs=3, train__threads=1)  # one thread: tiny tensors
    threads = torch.get_num_threads()
    try:
        train(load_config(data=cfg), tmp_path / "run", quiet=True)
    finally:
        torch.set_num_threads(threads)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(t["loss"] for t in line["train"].values()) for line in (lines[0], lines[-1]))
    assert last < first, f"{arch['name']} + {method}: train loss {first:.3f} -> {last:.3f}"
