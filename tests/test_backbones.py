"""timm and torchvision backbones: the cut into stem / stages / pool, weights files, normalisation, layer depths,
timm's options and the errors for bad input. Tiny models (timm's test_* models), no network, no downloads."""
import pickle
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from mtlvision.cli import main
from mtlvision.config import ModelConfig
from mtlvision.errors import CheckpointError, ConfigError
from mtlvision.models import build_model
from mtlvision.models.backbones import build_backbone
from mtlvision.tasks import Task

TASKS = [Task("a", list("0123")), Task("b", ["x", "y"])]
FAMILIES = {"resnet": "test_resnet", "convnext": "test_convnext", "efficientnet": "test_efficientnet",
            "mobilenet": "mobilenetv3_small_050", "vit": "test_vit"}


def timm_spec(model: str, **params) -> dict:
    return {"name": "timm", "model": model, **params}


def reference(model: str, size: int = 32, **kwargs) -> torch.nn.Module:
    """The timm model the backbone is made of, created as the backbone creates it (same seed, same arguments)."""
    torch.manual_seed(0)
    if timm.models.get_pretrained_cfg(model).fixed_input_size:
        kwargs["img_size"] = size
    return timm.create_model(model, num_classes=0, **kwargs).eval()


def seeded_backbone(spec: dict, channels: int = 3, size: int = 32, **kwargs):
    torch.manual_seed(0)
    return build_backbone(spec, channels, size, **kwargs).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_cut_reproduces_the_model_at_its_feature_levels(family):
    """Stages end at timm's feature levels (stride >= 4; a ViT's blocks in four groups); each stage output is
    timm's own forward_intermediates there, the pooled output its pre-logits features; no module is held twice."""
    name = FAMILIES[family]
    ref, bb = reference(name), seeded_backbone(timm_spec(name))
    x = torch.randn(2, 3, 32, 32)
    levels = [i for i, f in enumerate(ref.feature_info) if f["reduction"] >= 4]
    vit = family == "vit"
    if vit:
        levels = [1, 3, 4, 5]  # test_vit: 6 blocks in groups of 2, 2, 1, 1
    with torch.no_grad():
        want = ref.forward_intermediates(x, indices=levels, intermediates_only=True,
                                         **({"output_fmt": "NLC"} if vit else {}))
        h = bb.stem(x)
        for stage, w in zip(bb.stages, want):
            h = stage(h)
            torch.testing.assert_close(h[:, ref.num_prefix_tokens:] if vit else h, w)
        torch.testing.assert_close(bb.pool(h), ref.forward_head(ref.forward_features(x), pre_logits=True))
    assert len(bb.stages) == 4 and bb.layout == ("tokens" if vit else "spatial")
    assert bb.out_dim == ref.forward_head(ref.forward_features(x), pre_logits=True).shape[1]
    assert len(bb.state_dict()) == len(ref.state_dict())
    assert sum(p.numel() for p in bb.parameters()) == sum(p.numel() for p in ref.parameters())


def test_out_indices_choose_the_stage_ends():
    bb = build_backbone(timm_spec("test_resnet", out_indices=[2, 4]), 3, 32)
    assert list(dict(bb.stem.named_children())) == ["conv1", "bn1", "act1", "maxpool", "layer1"]
    assert [list(dict(s.named_children())) for s in bb.stages] == [["layer2"], ["layer3", "layer4"]]
    with pytest.raises(ConfigError, match=r"out_indices: expected increasing indices in 0\.\.4 .*layer1"):
        build_backbone(timm_spec("test_resnet", out_indices=[3, 1]), 3, 32)


def test_model_that_cannot_be_cut_is_used_whole_and_staged_architectures_say_why():
    """MambaOut's stages hand on channels-last maps: the check against forward_intermediates fails, so the model
    is used whole; hard sharing and cross-stitch work, MTAN and the MoE family refuse naming the reason."""
    bb = build_backbone(timm_spec("test_mambaout"), 3, 64)
    assert len(bb.stages) == 0 and "test_mambaout" in bb.unstaged and bb(torch.randn(2, 3, 64, 64)).shape == (2, 256)
    for arch in ("hps", "cross-stitch"):
        build_model(ModelConfig(backbone=timm_spec("test_mambaout"), architecture={"name": arch}), TASKS, (64, 64, 3))
    for arch in ("mtan", "mmoe", "ple"):
        with pytest.raises(ConfigError, match=r"needs a backbone cut into stages, and this one is not \(timm "
                                              r"model 'test_mambaout' \(MambaOut\).*work on it: hps, task-features, "
                                              r"cross-stitch"):
            build_model(ModelConfig(backbone=timm_spec("test_mambaout"), architecture={"name": arch}), TASKS,
                        (64, 64, 3))


def test_bad_names_and_options_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError, match="timm has no model 'convnext_tinyy'; did you mean convnext_tiny"):
        build_backbone(timm_spec("convnext_tinyy"), 3, 32)
    with pytest.raises(ConfigError, match="no pretrained tag 'in22k' for test_convnext; it has: test_convnext.r160"):
        build_backbone(timm_spec("test_convnext.in22k"), 3, 32)
    with pytest.raises(ConfigError, match=r"model\.backbone\.model: required"):
        build_backbone({"name": "timm"}, 3, 32)
    with pytest.raises(ConfigError, match=r"model\.backbone\.kwargs: .*unexpected keyword argument 'depthz'"):
        build_backbone(timm_spec("test_convnext", kwargs={"depthz": 2}), 3, 32)
    with pytest.raises(ConfigError, match=r"kwargs: \['in_chans'\] are set by mtlvision"):
        build_backbone(timm_spec("test_convnext", kwargs={"in_chans": 1}), 3, 32)
    with pytest.raises(ConfigError, match="exclude each other"):
        build_backbone(timm_spec("test_convnext", pretrained=True, weights="w.safetensors"), 3, 32)
    with pytest.raises(ConfigError, match=r"model\.backbone: unknown key\(s\) drop_path"):
        build_backbone(timm_spec("test_convnext", drop_path=0.1), 3, 32)
    with pytest.raises(ConfigError, match=r"model\.backbone\.drop_path_rate: expected a value in \[0, 1\)"):
        build_backbone(timm_spec("test_convnext", drop_path_rate=1.5), 3, 32)
    with pytest.raises(ConfigError, match="mean/std: set both"):
        build_backbone(timm_spec("test_convnext", mean=[0.5, 0.5, 0.5]), 3, 32)


def test_image_sizes_a_backbone_cannot_take():
    with pytest.raises(ConfigError, match=r"16x16 patches: 40 px is not a multiple of 16; it takes 32 or 48 px"):
        build_backbone(timm_spec("test_vit"), 3, 40)
    vit = build_backbone(timm_spec("test_vit"), 3, 48)  # img_size at creation: position embeddings for 3x3 patches
    assert vit.stem(torch.zeros(1, 3, 48, 48)).shape == (1, 1 + 9, 64)
    with pytest.raises(ConfigError, match=r"'test_convnext' cannot take 16 px images \(it reduces them up to 32x\)"):
        build_backbone(timm_spec("test_convnext"), 3, 16)


def test_timm_create_model_options_grayscale_and_drop_path():
    bb = build_backbone(timm_spec("test_efficientnet", drop_path_rate=0.2), 1, 32)
    assert bb.stem.conv_stem.in_channels == 1 and bb(torch.randn(2, 1, 32, 32)).shape == (2, bb.out_dim)
    rates = [m.drop_prob for m in bb.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) > 0.1  # timm spreads the rate over the blocks
    plain = build_backbone(timm_spec("test_efficientnet"), 1, 32)
    assert not [m for m in plain.modules() if type(m).__name__ == "DropPath"]


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(family):
    name = FAMILIES[family]
    grads, calls = [], []
    for on in (False, True):
        bb = seeded_backbone(timm_spec(name, grad_checkpointing=on)).train()
        block = bb.stages[1][0] if family == "vit" else bb.stages[1][0].blocks[0]
        n = []
        block.register_forward_pre_hook(lambda *_: n.append(1))
        torch.manual_seed(1)
        bb(torch.randn(2, 3, 32, 32)).square().sum().backward()
        grads.append([p.grad for p in bb.parameters()])
        calls.append(len(n))
    assert calls == [1, 2]  # run again in the backward pass
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


# -- weights files ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def convnext_file(tmp_path_factory):
    """A test_convnext checkpoint as timm writes it (classifier included) and the features it gives."""
    torch.manual_seed(3)
    full = timm.create_model("test_convnext").eval()
    path = tmp_path_factory.mktemp("weights") / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return path, x, full.forward_head(full.forward_features(x), pre_logits=True), full.state_dict()


def _features(spec: dict, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return build_backbone(spec, 3, 32).eval()(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_loads_into_the_cut_model(convnext_file, suffix, tmp_path):
    path, x, want, state = convnext_file
    if suffix == ".pth":  # a training checkpoint holding the state dict
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": state, "epoch": 3}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing unexpected: no warning
        bb = build_backbone(timm_spec("test_convnext", weights=str(path)), 3, 32)
    torch.testing.assert_close(bb.eval()(x), want)
    report = bb.weights_report
    assert report.loaded == len(state) - 2 and not report.missing and not report.unexpected  # classifier dropped
    assert "assumed for the weights file" in bb.normalization.source  # timm's pretrained_cfg, said to be assumed
    assert bb.normalization.mean == timm.models.get_pretrained_cfg("test_convnext").mean
    skipped = build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "absent.pth")), 3, 32,
                             load_weights=False)  # a checkpoint's weights replace them: the file is not read
    assert skipped.weights_report is None
    assert (skipped.normalization.mean, skipped.normalization.std) == (bb.normalization.mean, bb.normalization.std)


def test_weights_file_missing_and_unexpected_tensors_are_reported(convnext_file, tmp_path):
    _, _, _, state = convnext_file
    partial = {k: v for k, v in state.items() if not k.startswith("stages.3.")}
    partial["extra.weight"] = torch.zeros(3)
    save_file({k: v.contiguous() for k, v in partial.items()}, str(tmp_path / "p.safetensors"))
    with pytest.warns(UserWarning, match=r"missing, left at their initialisation: stages\.3\..*1 unexpected, "
                                         r"ignored: extra\.weight"):
        bb = build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "p.safetensors")), 3, 32)
    assert all(k.startswith("stages.3.") for k in bb.weights_report.missing)
    assert bb.weights_report.unexpected == ("extra.weight",)


def test_weights_file_that_does_not_fit_is_refused(convnext_file, tmp_path):
    _, _, _, state = convnext_file
    wrong = dict(state, **{"stem.0.weight": torch.zeros(5, 3, 4, 4)})
    save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) have another shape: stem\.0\.weight \(5, 3, 4, 4\) in "
                                              r"the file, \(24, 3, 4, 4\) in the model"):
        build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "w.safetensors")), 3, 32)
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match=r"matches nothing in the model.*file: fc\.weight"):
        build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "other.safetensors")), 3, 32)
    with pytest.raises(CheckpointError, match=r"weights: no weights file at .*absent\.pth"):
        build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "absent.pth")), 3, 32)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "junk.pth")), 3, 32)


class _Payload:
    """Unpickling this would create a file: a pickle with code in it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_with_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"stem.0.weight": torch.zeros(1), "payload": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth is refused: it is a pickle holding Python objects") as exc:
        build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "evil.pth")), 3, 32)
    assert not marker.exists()
    assert "weights_only=False" not in str(exc.value) and "safetensors" in str(exc.value)
    with open(tmp_path / "state.pkl", "wb") as f:  # a plain pickle of an object is refused the same way
        pickle.dump(_Payload(marker), f, protocol=2)
    with pytest.raises(CheckpointError, match="is refused"):
        build_backbone(timm_spec("test_convnext", weights=str(tmp_path / "state.pkl")), 3, 32)
    assert not marker.exists()


def test_pretrained_without_network_says_how_to_use_a_local_file(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # as without network: the hub answers from its cache only
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match=r"pretrained: cannot download timm's weights for 'test_vit'.*"
                                              r"weights: /path/to/file\.safetensors and pretrained: false"):
        build_backbone(timm_spec("test_vit", pretrained=True), 3, 32)


# -- normalisation and layer depths -------------------------------------------------------------------------------

def test_normalization_declared_by_the_weights():
    assert build_backbone(timm_spec("test_convnext"), 3, 32).normalization is None  # from scratch: dataset stats
    vit = build_backbone(timm_spec("test_vit", pretrained=True), 3, 32, load_weights=False)
    assert (vit.normalization.mean, vit.normalization.std) == ((0.5,) * 3, (0.5,) * 3)
    assert vit.normalization.source == "timm pretrained_cfg of test_vit.r160_in1k"
    res = build_backbone(timm_spec("test_efficientnet", pretrained=True), 1, 32, load_weights=False)
    assert res.normalization.mean == pytest.approx((sum(timm.data.IMAGENET_DEFAULT_MEAN) / 3,))
    own = build_backbone(timm_spec("test_resnet", mean=[0.1, 0.2, 0.3], std=[1, 2, 3]), 3, 32)
    assert (own.normalization.mean, own.normalization.std, own.normalization.source) == (
        (0.1, 0.2, 0.3), (1.0, 2.0, 3.0), "model.backbone.mean/std")


def test_layer_ids_follow_timm_group_matcher():
    """ViT: embeddings 0, block k at k + 1, final norm at the top (timm's layer-decay grouping); ConvNeXt: each
    block its own depth; resnet18 and smallcnn: stem 0, stage k at k + 1, pool last."""
    vit = build_backbone(timm_spec("test_vit"), 3, 32)
    ids = vit.layer_ids()
    assert set(ids) == {n for n, _ in vit.named_parameters()} and vit.num_layers == 6 + 1
    assert ids["stem.model.cls_token"] == ids["stem.model.patch_embed.proj.weight"] == 0
    assert ids["stages.0.blocks__1.attn.qkv.weight"] == 2 and ids["stages.3.blocks__5.mlp.fc2.bias"] == 6
    assert ids["pool.tail.norm.weight"] == 6
    ref = timm.create_model("test_convnext", num_classes=0)
    want = timm.models.group_parameters(ref, ref.group_matcher(coarse=False), reverse=True)
    convnext = build_backbone(timm_spec("test_convnext"), 3, 32)
    assert sorted(convnext.layer_ids().values()) == sorted(want.values()) and convnext.num_layers == 11
    for spec in ({"name": "resnet18", "width": 0.25}, {"name": "smallcnn", "width": 4}):
        bb = build_backbone(spec, 3, 32)
        depth = {n.split(".")[0] if not n.startswith("stages") else n[:8]: d for n, d in bb.layer_ids().items()}
        last = len(bb.stages) + 1
        resnet = spec["name"] == "resnet18"  # smallcnn's stem is empty, resnet18's pool has no parameters
        assert depth == {**({"stem": 0} if resnet else {}), **{f"stages.{k}": k + 1 for k in range(len(bb.stages))},
                         **({} if resnet else {"pool": last})}
        assert bb.num_layers == last + 1
    bottom = vit.bottom(2)  # the MoE family's shared bottom keeps the depths of its parameters
    assert bottom.layer_ids() == {n: d for n, d in ids.items() if n.startswith(("stem.", "stages.0.", "stages.1."))}
    assert bottom.num_layers == vit.num_layers


# -- torchvision --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_cut_reproduces_the_model(name):
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name).eval()
    if name == "resnet18":
        ref.fc = torch.nn.Identity()
    else:
        ref.classifier[-1] = torch.nn.Identity()
    bb = seeded_backbone({"name": "torchvision", "model": name}, size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x), ref(x))
    assert len(bb.stages) == 4 and bb.normalization is None  # no weights: the dataset's statistics


def test_torchvision_weights_enum_file_and_errors(tmp_path, monkeypatch):
    spec = {"name": "torchvision", "model": "resnet18"}
    bb = build_backbone({**spec, "weights": "DEFAULT"}, 3, 32, load_weights=False)
    assert bb.normalization.source == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert bb.normalization.mean == (0.485, 0.456, 0.406)
    torch.manual_seed(5)
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    loaded = build_backbone({**spec, "weights": str(tmp_path / "r18.pth")}, 3, 32)
    torch.testing.assert_close(loaded.stem[0].weight, net.conv1.weight)
    assert loaded.weights_report.loaded == len(net.state_dict())
    gray = build_backbone({**spec, "weights": str(tmp_path / "r18.pth")}, 1, 32)  # first conv: RGB summed
    torch.testing.assert_close(gray.stem[0].weight, net.conv1.weight.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="no weights 'IMAGENET1K_V9' for resnet18; it has IMAGENET1K_V1, DEFAULT"):
        build_backbone({**spec, "weights": "IMAGENET1K_V9"}, 3, 32)
    with pytest.raises(ConfigError, match=r"cuts torchvision's ResNet, .* not vgg11 \(VGG\); timm has it"):
        build_backbone({"name": "torchvision", "model": "vgg11"}, 3, 32)
    with pytest.raises(ConfigError, match="no model 'resnet5'; did you mean"):
        build_backbone({"name": "torchvision", "model": "resnet5"}, 3, 32)
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "urlopen", offline)
    with pytest.raises(CheckpointError, match=r"cannot download torchvision's ResNet18_Weights\.IMAGENET1K_V1 .*give "
                                              r"its path as model\.backbone\.weights"):
        build_backbone({**spec, "weights": "IMAGENET1K_V1"}, 3, 32)


def test_cli_lists_timm_and_torchvision_models(capsys):
    main(["list", "backbones", "--timm", "test_conv*"])
    out = capsys.readouterr().out
    assert "test_convnext" in out and "test_vit" not in out
    main(["list", "--torchvision"])
    assert "resnet50" in capsys.readouterr().out
