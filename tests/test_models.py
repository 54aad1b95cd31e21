import pytest
import torch
import torchvision

from mtlvision.config import ModelConfig
from mtlvision.models import build_model
from mtlvision.models.backbones import build_backbone
from mtlvision.tasks import Task

TASKS = [Task("a", list("0123456789")), Task("b", ["x", "y"]), Task("c", ["p", "q", "r"])]


def test_resnet18_full_width_matches_torchvision():
    bb = build_backbone({"name": "resnet18", "stem": "imagenet"}, 3, 224)
    ref = torchvision.models.resnet18()
    n_ref = sum(p.numel() for n, p in ref.named_parameters() if not n.startswith("fc."))
    assert sum(p.numel() for p in bb.parameters()) == n_ref
    assert bb.out_dim == 512
    assert isinstance(bb.stem[3], torch.nn.MaxPool2d)


def test_resnet18_cifar_stem_and_width():
    bb = build_backbone({"name": "resnet18", "width": 0.25}, 3, 32)
    assert bb.stem[0].kernel_size == (3, 3) and bb.stem[0].stride == (1, 1)
    assert isinstance(bb.stem[3], torch.nn.Identity)
    assert bb.out_dim == 128
    assert bb(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert len(bb.stages) == 4
    big = build_backbone({"name": "resnet18", "width": 0.25}, 3, 96)  # > 64 px: ImageNet stem
    assert big.stem[0].kernel_size == (7, 7)


@pytest.mark.parametrize("spec,size", [({"width": 0.25}, 32), ({"stem": "imagenet"}, 224)])
def test_resnet18_init_schemes(spec, size):
    """torchvision: Kaiming-normal fan-out; pytorch: each conv's own default (Kaiming-uniform, a=sqrt(5))."""
    torch.manual_seed(0)
    tv = build_backbone({"name": "resnet18", **spec}, 3, size)
    pt = build_backbone({"name": "resnet18", "init": "pytorch", "zero_init_residual": False, **spec}, 3, size)
    conv_tv, conv_pt = tv.stages[2][1].conv1, pt.stages[2][1].conv1  # 3x3, fan-in = fan-out
    fan = conv_tv.weight[0].numel()
    assert conv_tv.weight.std().item() == pytest.approx((2 / fan) ** 0.5, rel=0.05)
    assert conv_pt.weight.std().item() == pytest.approx((1 / (3 * fan)) ** 0.5, rel=0.05)
    assert conv_pt.weight.abs().max().item() <= fan ** -0.5 + 1e-6  # uniform on +-1/sqrt(fan_in)
    assert torch.all(tv.stages[0][0].bn2.weight == 0) and torch.all(pt.stages[0][0].bn2.weight == 1)


def test_smallcnn_shapes_and_grayscale():
    bb = build_backbone({"name": "smallcnn", "width": 8, "out_dim": 20}, 1, 28)
    assert bb(torch.randn(3, 1, 28, 28)).shape == (3, 20)


@pytest.mark.parametrize("arch", [{"name": "hps"}, {"name": "task-features", "feature_dim": 16},
                                  {"name": "task-features", "feature_dim": 16, "sharing": "gate"}])
def test_architectures_forward_and_backward(arch):
    model = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 8, "out_dim": 32},
                                    architecture=arch), TASKS, (32, 32, 3))
    out = model(torch.randn(4, 3, 32, 32))
    assert {k: v.shape for k, v in out.logits.items()} == {"a": (4, 10), "b": (4, 2), "c": (4, 3)}
    assert out.shared[0].shape == (4, 32)
    sum(v.sum() for v in out.logits.values()).backward()
    assert all(p.grad is not None for p in model.shared_parameters())
    shared = {id(p) for p in model.shared_parameters()}
    assert shared.isdisjoint(id(p) for p in model.task_parameters())
    assert len(model.shared_parameters()) + len(model.task_parameters()) == len(list(model.parameters()))


def test_task_features_starts_with_independent_task_features():
    """W_o = 0 at init: task a's logits do not depend on task b's projection."""
    model = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 8, "out_dim": 32},
                                    architecture={"name": "task-features", "feature_dim": 16}), TASKS, (32, 32, 3))
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    before = model(x).logits["a"].clone()
    with torch.no_grad():
        model.proj_weight[1].normal_()
    assert torch.allclose(model(x).logits["a"], before)
    with torch.no_grad():
        model.out.weight.normal_()
    assert not torch.allclose(model(x).logits["a"], before)  # once W_o is learned, tasks share
    mix = model.mixing(torch.randn(4, 3, 16))
    torch.testing.assert_close(mix.sum(-1), torch.ones(4, 3))


def test_mlp_head():
    model = build_model(ModelConfig(backbone={"name": "smallcnn", "width": 8, "out_dim": 32},
                                    architecture={"name": "hps"}, head={"name": "mlp", "hidden": 7}),
                        TASKS, (32, 32, 3))
    assert model.heads[0][0].out_features == 7


@pytest.mark.parametrize("decay_norms", [False, True])
def test_weight_decay_groups(decay_norms):
    """Conv/linear weights are decayed; norms and biases only with train.decay_norms; gates never."""
    from mtlvision.config import TrainConfig
    from mtlvision.training.optim import build_optimizer

    model = build_model(ModelConfig(backbone={"name": "resnet18", "width": 0.125},
                                    architecture={"name": "task-features", "feature_dim": 16}), TASKS, (32, 32, 3))
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = build_optimizer(TrainConfig(decay_norms=decay_norms), model, []).param_groups
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    one_d = {n for n, p in model.named_parameters() if p.ndim == 1} - set(model.no_weight_decay)
    assert one_d and (one_d <= decayed if decay_norms else not one_d & decayed)
    assert {n for n, p in model.named_parameters() if p.ndim > 1} - set(model.no_weight_decay) <= decayed
    assert not set(model.no_weight_decay) & decayed
