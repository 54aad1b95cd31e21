"""Every architecture on timm backbones of four families (ResNet, ConvNeXt, EfficientNet, ViT), single- and
multi-input, with a feature-space gradient method (MGDA) and equal weighting; ONNX export for one architecture
per family. Tiny timm test models, no pretrained weights, 32 px images."""
import pytest
import torch

from mtlvision.balancing import StepContext, build_balancer
from mtlvision.config import ModelConfig
from mtlvision.models import ARCHITECTURES, build_model
from mtlvision.tasks import Task

from test_export import check_export, needs_onnx, tiny_model

FAMILIES = {"resnet": "test_resnet", "convnext": "test_convnext", "efficientnet": "test_efficientnet",
            "vit": "test_vit"}
SMALL_ARCH = {"mmoe": {"experts": 2}, "cgc": {"shared_experts": 1}, "ple": {"shared_experts": 1},
              "dselect-k": {"experts": 2, "k": 1}, "task-features": {"feature_dim": 8}}
TASKS = [Task("a", list("0123")), Task("b", ["x", "y"]), Task("c", ["p", "q", "r"])]
SINGLE = {"a": slice(0, 8), "b": slice(0, 8), "c": slice(0, 8)}
MULTI = {"a": slice(0, 4), "b": slice(0, 4), "c": slice(4, 8)}  # two datasets: tasks a, b on the first rows


def _model(family: str, arch: str):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone={"name": "timm", "model": FAMILIES[family]},
                      architecture={"name": arch, **SMALL_ARCH.get(arch, {})})
    return build_model(cfg, TASKS, (32, 32, 3))


def _losses(out, y, rows):
    return {t.name: t.loss(out.logits[t.name][rows[t.name]], y[t.name][rows[t.name]]) for t in TASKS}


def _step(model, method: str, x, y, rows) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    balancer = build_balancer({"method": method}, TASKS)
    out = model(x, split=balancer.needs_shared_features)
    ctx = StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0, trunk=out.trunk)
    return balancer.backward(_losses(out, y, rows), ctx)


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
@pytest.mark.parametrize("family", FAMILIES)
def test_every_architecture_trains_on_every_family(family, arch):
    """Finite gradients reaching the stem, and feature-space MGDA's trunk gradients equal to the gradient of
    Σ w_t L_t through the unsplit graph: the cut at the shared tensors is right for the family."""
    model = _model(family, arch)
    if family == "vit":
        assert model.backbone.layout == "tokens"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = {t.name: torch.randint(0, t.num_classes, (8,), generator=g) for t in TASKS}
    stem = next(model.backbone.stem.parameters())
    for rows in (SINGLE, MULTI):
        for method in ("equal", "mgda"):
            weights = _step(model, method, x, y, rows)
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert all(torch.isfinite(gr).all() for gr in grads), (family, arch, method)
            assert stem.grad is not None and stem.grad.abs().sum() > 0
        shared = model.shared_parameters()
        split = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in shared]
        model.zero_grad(set_to_none=True)
        losses = _losses(model(x), y, rows)
        sum(weights[k] * v for k, v in losses.items()).backward()
        for p, want in zip(shared, split):
            got = p.grad if p.grad is not None else torch.zeros_like(p)
            torch.testing.assert_close(want, got, atol=1e-5, rtol=1e-3)


@needs_onnx
@pytest.mark.parametrize("family,arch", [("resnet", "hps"), ("convnext", "mtan"), ("efficientnet", "cgc"),
                                         ("vit", "mtan")])
def test_export_matches_predict_on_every_family(family, arch, tmp_path):
    spec = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "image_shape": [32, 32, 3]}
    model = tiny_model(arch, TASKS, spec, backbone={"name": "timm", "model": FAMILIES[family]})
    diffs = check_export(model, TASKS, spec, tmp_path / f"{family}.onnx")
    assert max(diffs.values()) < 1e-4
