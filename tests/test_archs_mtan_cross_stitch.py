"""MTAN and cross-stitch networks: shapes, parameter counts, the shared-representation cut, training;
and the `mtlvision archs` command."""
import io
import json

import pytest
import torch

from mtlvision.balancing import StepContext, build_balancer
from mtlvision.cli import build_parser, main
from mtlvision.config import ModelConfig, load_config
from mtlvision.errors import ConfigError
from mtlvision.models import ARCHITECTURES, build_model
from mtlvision.tasks import Task
from mtlvision.training import train

from conftest import tiny_config

TASKS = [Task("a", list("0123456789")), Task("b", ["x", "y"]), Task("c", ["p", "q", "r"])]
SMALL = {"name": "smallcnn", "width": 4, "out_dim": 16}
ARCHS = [{"name": "mtan"}, {"name": "mtan", "reduction": 2}, {"name": "cross-stitch"},
         {"name": "cross-stitch", "mixing": "stage"}]


def _model(arch, backbone=SMALL, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(backbone=backbone, architecture=arch), TASKS, (16, 16, 3))


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    return x, {t.name: torch.randint(0, t.num_classes, (n,), generator=g) for t in TASKS}


def _losses(out, y):
    return {t.name: t.loss(out.logits[t.name], y[t.name]) for t in TASKS}


@pytest.mark.parametrize("backbone", [SMALL, {"name": "resnet18", "width": 0.125}], ids=["smallcnn", "resnet18"])
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a.values())))
def test_forward_shapes_and_parameter_split(arch, backbone):
    model = _model(arch, backbone)
    out = model(torch.randn(4, 3, 16, 16))
    assert {k: v.shape for k, v in out.logits.items()} == {"a": (4, 10), "b": (4, 2), "c": (4, 3)}
    assert all(s.shape[0] == 4 for s in out.shared) and len(out.shared) == len(out.trunk)
    if arch["name"] == "mtan":  # one shared tensor per backbone stage
        assert [s.shape[1] for s in out.shared] == model.backbone.stage_channels()
    else:  # the stacked pooled features of the T networks, batch first
        assert [s.shape for s in out.shared] == [(4, 3, model.backbone.out_dim)]
    sum(v.sum() for v in out.logits.values()).backward()
    shared = {id(p) for p in model.shared_parameters()}
    assert shared.isdisjoint(id(p) for p in model.task_parameters())
    assert len(shared) + len(model.task_parameters()) == len(list(model.parameters()))
    assert all(p.grad is not None for p in model.parameters())


# smallcnn width 4, out_dim 16, 3x3 pooled grid, RGB: stages of 3x3 convs (no bias) + BN (2 per channel)
STAGES = [4, 8, 16]
BACKBONE = (27 * 4 + 8 + 36 * 4 + 8) + (36 * 8 + 16 + 72 * 8 + 16) + (72 * 16 + 32 + 144 * 16 + 32)
POOL = 16 * 9 * 16 + 16  # Linear(16 channels x 3 x 3 -> 16)
HEADS = 17 * 10 + 17 * 2 + 17 * 3


def test_parameter_counts_by_hand():
    assert sum(p.numel() for p in _model({"name": "hps"}).parameters()) == BACKBONE + POOL + HEADS
    # MTAN, reduction 1: per task and stage, 1x1 conv (C or 2C -> C) + BN + 1x1 conv (C -> C) + BN;
    # per stage after the first, one shared f: 3x3 conv (C_{j-1} -> C_j) + BN
    att = sum((c if j == 0 else 2 * c) * c + 2 * c + c * c + 2 * c for j, c in enumerate(STAGES))
    f = sum(9 * a * b + 2 * b for a, b in zip(STAGES, STAGES[1:]))
    mtan = _model({"name": "mtan"})
    assert sum(p.numel() for p in mtan.parameters()) == BACKBONE + POOL + 3 * att + f + HEADS
    assert sum(p.numel() for p in mtan.shared_parameters()) == BACKBONE  # stem + stages; pool is task-side
    # mid channels C / 2 with reduction 2
    att2 = sum((c if j == 0 else 2 * c) * (c // 2) + c + (c // 2) * c + 2 * c for j, c in enumerate(STAGES))
    assert sum(p.numel() for p in _model({"name": "mtan", "reduction": 2}).parameters()) == (
        BACKBONE + POOL + 3 * att2 + f + HEADS)
    # cross-stitch: 3 networks, a 3x3 matrix per channel after each stage and per pooled unit
    cs = _model({"name": "cross-stitch"})
    stitches = 9 * (sum(STAGES) + 16)
    assert sum(p.numel() for p in cs.parameters()) == 3 * (BACKBONE + POOL) + stitches + HEADS
    assert sum(p.numel() for p in cs.shared_parameters()) == 3 * (BACKBONE + POOL) + 9 * sum(STAGES)
    per_stage = _model({"name": "cross-stitch", "mixing": "stage"})
    assert sum(p.numel() for p in per_stage.parameters()) == 3 * (BACKBONE + POOL) + 9 * 4 + HEADS


def test_cross_stitch_initialisation_and_no_weight_decay():
    cs = _model({"name": "cross-stitch", "alpha_same": 0.8, "alpha_diff": 0.2})
    expect = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    for alpha in [*cs.stitches, cs.final_stitch]:
        torch.testing.assert_close(alpha.detach(), expect.expand_as(alpha))
    assert cs.no_weight_decay == {f"stitches.{j}" for j in range(3)} | {"final_stitch"}
    assert cs.no_weight_decay <= dict(cs.named_parameters()).keys()
    nets = cs.networks()  # deep copies: identical start, separate parameters
    assert len(nets) == 3 and len({id(n.stages[0][0].weight) for n in nets}) == 3
    assert torch.equal(nets[0].stages[0][0].weight, nets[2].stages[0][0].weight)


def test_cross_stitch_identity_mixing_is_independent_networks():
    cs = _model({"name": "cross-stitch", "alpha_same": 1.0, "alpha_diff": 0.0})
    with torch.no_grad():  # make the copies differ, so that any mixing would show
        for i, net in enumerate(cs.networks()):
            for p in net.parameters():
                p.add_(0.05 * (i + 1) * torch.randn_like(p))
    x, _ = _batch(1)
    for mode in (cs.eval, cs.train):
        mode()
        out = cs(x).logits
        for name, net, head in zip(cs.task_names, cs.networks(), cs.heads):
            torch.testing.assert_close(out[name], head(net(x)), rtol=0, atol=0)
    cs.eval()
    with torch.no_grad():
        cs.stitches[0].copy_(torch.full((3, 3), 1 / 3).expand_as(cs.stitches[0]))
    assert not torch.allclose(cs(x).logits["a"], cs.heads[0](cs.networks()[0](x)))


@pytest.mark.parametrize("arch", [{"name": "mtan"}, {"name": "cross-stitch"}], ids=["mtan", "cross-stitch"])
def test_feature_space_method_gives_the_trunk_the_combined_gradient(arch):
    """split graph + MGDA: trunk grads = grad of sum_t w_t L_t; task-side grads = grad of sum_t L_t."""
    x, y = _batch(2)
    model, ref = _model(arch), _model(arch)
    out = model(x, split=True)
    assert all(s.is_leaf and s.requires_grad for s in out.shared)  # the graph is cut there
    balancer = build_balancer({"method": "mgda"}, TASKS)
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=out.trunk)
    w = balancer.backward(_losses(out, y), ctx)
    assert abs(sum(w.values()) - 1) < 1e-5 and len(set(round(v, 4) for v in w.values())) > 1
    assert (balancer.gramian - torch.diag(balancer.gramian.diagonal())).abs().max() > 0  # tasks interact
    losses = _losses(ref(x), y)
    trunk_ref = torch.autograd.grad(sum(w[n] * losses[n] for n in w), ref.shared_parameters(), retain_graph=True)
    task_ref = torch.autograd.grad(sum(losses.values()), ref.task_parameters())
    for p, g in zip([*model.shared_parameters(), *model.task_parameters()], [*trunk_ref, *task_ref]):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


EVERY = [{"name": n} for n in ARCHITECTURES.names()] + [{"name": "dselect-k", "entropy_reg": 0.1},
                                                        {"name": "ple", "levels": 1}]


@pytest.mark.parametrize("arch", EVERY, ids=lambda a: "-".join(map(str, a.values())))
def test_split_graph_reaches_shared_parameters_only_through_the_trunk(arch):
    """split graph, train mode: the backward of the task losses alone gives every task parameter a gradient and no
    shared parameter one (no trunk path bypasses the cut); the backward of the trunk tensors reaches every shared
    parameter and no task parameter (shared_parameters() is exactly what lies upstream of the cut)."""
    x, y = _batch(4)
    model = _model(arch)
    out = model(x, split=True)
    shared, task = model.shared_parameters(), model.task_parameters()
    assert len({id(p) for p in shared}) == len(shared) and len(shared) + len(task) == len(list(model.parameters()))
    torch.autograd.backward(list(_losses(out, y).values()), retain_graph=True)
    assert all(p.grad is None for p in shared) and all(p.grad is not None for p in task)
    model.zero_grad(set_to_none=True)
    torch.autograd.backward(list(out.trunk), [torch.randn_like(t) for t in out.trunk])
    assert all(p.grad is not None for p in shared) and all(p.grad is None for p in task)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: "-".join(map(str, a.values())))
def test_state_dict_round_trip(arch):
    a, b = _model(arch, seed=0), _model(arch, seed=1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x, _ = _batch(3)
    a(x)  # move BatchNorm running statistics
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    a.eval()
    b.eval()
    for name, logits in a(x).logits.items():
        torch.testing.assert_close(b(x).logits[name], logits, rtol=0, atol=0)


@pytest.mark.parametrize("arch, message", [
    ({"name": "mtan", "reduction": 0}, "model.architecture.reduction"),
    ({"name": "cross-stitch", "alpha_same": 1.5}, "model.architecture.alpha_same"),
    ({"name": "cross-stitch", "alpha_diff": -0.1}, "model.architecture.alpha_diff"),
    ({"name": "cross-stitch", "mixing": "pixel"}, "model.architecture.mixing"),
    ({"name": "mtan", "heads": 2}, "unknown key(s) heads"),
])
def test_bad_parameters_name_the_key(arch, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(data=tiny_config(model__architecture=arch))


@pytest.mark.parametrize("method", ["equal", "pcgrad", "mgda"])
@pytest.mark.parametrize("arch", ["mtan", "cross-stitch"])
def test_trains_with_balancing_methods(arch, method, tmp_path):
    cfg = tiny_config(model__architecture={"name": arch}, model__backbone=dict(SMALL), balancing={"method": method},
                      data__source__n_train=360, data__source__n_test=40, data__batch_size=32)
    summary = train(load_config(data=cfg), tmp_path / "run", quiet=True)
    epochs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, last = (sum(m["loss"] for m in e["train"].values()) for e in (epochs[0], epochs[-1]))
    assert last < first, f"{arch} + {method}: train loss {first:.3f} -> {last:.3f}"
    assert summary["architecture"] == arch


def test_archs_command_lists_every_architecture(capsys):
    argv = ["archs", "--backbone", "smallcnn", "--width", "4", "--image-size", "16", "--tasks", "2"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["architecture"]: r for r in out["architectures"]}
    assert sorted(rows) == ARCHITECTURES.names()
    assert rows["hps"]["relative_flops"] == 1.0
    assert rows["cross-stitch"]["relative_flops"] > 1.9  # two backbones
    assert rows["mtan"]["shared_parameters"] < rows["mtan"]["parameters"]
    tasks = [Task(f"task{i}", [str(c) for c in range(10)]) for i in range(2)]
    model = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 4}, architecture={"name": "mtan"}),
                        tasks, (16, 16, 3))
    assert rows["mtan"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in ARCHITECTURES.names())
    assert main(["archs", "--backbone", "nope"]) == 2
    assert "unknown backbone 'nope'" in capsys.readouterr().err
    assert main(["archs", "--tasks", "0"]) == 2
    assert "--tasks: expected >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["archs", "--help"])
    assert e.value.code == 0 and "usage: mtlvision archs" in capsys.readouterr().out
