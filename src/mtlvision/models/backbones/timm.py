"""Any timm model as a backbone: `{name: timm, model: convnext_tiny, pretrained: true}`.

The model is made by `timm.create_model` (num_classes=0, in_chans from the data, img_size for models
with a fixed input size, drop_path_rate and any other keyword arguments given), its weights come from
timm's own download code and cache (`pretrained`) or from a local file (`weights`, loaded through timm's
`load_pretrained`, which adapts the file to the model as it adapts its own: the model's checkpoint filter,
first convolution summed for other channel counts, classifier dropped). The declared input
normalisation is the weights' `pretrained_cfg` mean/std, or `mean`/`std` when given; the layer depths
for layer-wise learning-rate decay are timm's `group_matcher` groups. `timm_cut` cuts the model into stem,
stages and pool.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
from typing import Any, Optional

from torch import nn

from ...errors import CheckpointError, ConfigError
from ...registry import BACKBONES
from .base import Backbone, Normalization
from .timm_cut import cut
from .weights import LoadReport, check_state, read_state_dict, watched_load, weights_path

WHERE = "model.backbone"
_RESERVED = ("num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "features_only",
             "checkpoint_path", "drop_path_rate")  # set by mtlvision or by their own keys


@dataclasses.dataclass
class TimmParams:
    model: str = ""  # timm model name, optionally with a pretrained tag: convnext_tiny, convnext_tiny.fb_in22k
    pretrained: bool = False  # timm's pretrained weights for `model`, downloaded once into timm's cache
    weights: Optional[str] = None  # a local weights file instead: safetensors, or a .pth/.pt state dict
    mean: Optional[list[float]] = None  # input normalisation of the weights (default: timm's pretrained_cfg)
    std: Optional[list[float]] = None
    drop_path_rate: Optional[float] = None  # stochastic depth (None: the model's default)
    grad_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    out_indices: Optional[list[int]] = None  # feature levels (indices into timm's feature_info) ending stages
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # more timm.create_model arguments

    def __post_init__(self) -> None:
        if self.pretrained and self.weights:
            raise ConfigError(f"{WHERE}: pretrained (timm's download) and weights (a local file) exclude each other")
        if (self.mean is None) != (self.std is None):
            raise ConfigError(f"{WHERE}.mean/std: set both or neither")
        if self.std is not None and (not self.std or min(self.std) <= 0 or len(self.std) != len(self.mean)):
            raise ConfigError(f"{WHERE}.std: expected one positive value per mean value, got {self.std}")
        if self.drop_path_rate is not None and not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"{WHERE}.drop_path_rate: expected a value in [0, 1), got {self.drop_path_rate}")
        reserved = sorted(set(self.kwargs) & set(_RESERVED))
        if reserved:
            raise ConfigError(f"{WHERE}.kwargs: {reserved} are set by mtlvision or by their own keys "
                              "(pretrained, weights, drop_path_rate; in_chans comes from the data)")


def model_name(value: str) -> str:
    """`value` if timm has such a model; a ConfigError suggesting close names otherwise."""
    import timm

    if not value:
        raise ConfigError(f"{WHERE}.model: required: a timm model name such as resnet50, convnext_tiny or "
                          "vit_small_patch16_224 (list them: mtlvision list backbones --timm 'convnext*')")
    if not timm.is_model(value):
        close = difflib.get_close_matches(value.split(".")[0], timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{WHERE}.model: timm has no model {value!r}{hint} "
                          f"(list them: mtlvision list backbones --timm '{value[:4]}*')")
    arch, _, tag = value.partition(".")
    if tag and value not in timm.list_pretrained(f"{arch}.*"):
        raise ConfigError(f"{WHERE}.model: timm has no pretrained tag {tag!r} for {arch}; it has: "
                          f"{', '.join(timm.list_pretrained(f'{arch}.*')) or 'none'}")
    return value


def _create(name: str, pretrained: bool, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{WHERE}.kwargs: timm.create_model({name!r}) refused a keyword argument "
                          f"(of {sorted(kwargs)}; drop_path_rate and img_size come from their own keys): "
                          f"{exc}") from exc
    except RuntimeError as exc:
        if pretrained and "pretrained" in str(exc):
            raise ConfigError(f"{WHERE}.pretrained: {exc}; models with weights: "
                              "mtlvision list backbones --timm 'PATTERN' --pretrained") from exc
        raise
    except OSError as exc:
        if not pretrained:
            raise
        raise CheckpointError(
            f"{WHERE}.pretrained: cannot download timm's weights for {name!r}: {str(exc).splitlines()[0][:300]}. "
            f"Without network, use a local file: on a machine with network, save timm.create_model({name!r}, "
            "pretrained=True).state_dict() with safetensors.torch.save_file, copy it here and set "
            f"{WHERE}.weights: /path/to/file.safetensors and pretrained: false (or copy timm's cache, "
            "~/.cache/huggingface)") from exc


def _check_image_size(model: nn.Module, name: str, image_size: int) -> None:
    """A ConfigError if the model cuts images into patches that `image_size` is not a multiple of."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    p = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
    if image_size % p:
        low, high = max(p, image_size // p * p), (image_size // p + 1) * p
        raise ConfigError(f"{WHERE}: timm model {name!r} cuts images into {p}x{p} patches: {image_size} px is not "
                          f"a multiple of {p}; it takes {low} or {high} px (data.image_size), or any multiple of {p}")


def _load_file(model: nn.Module, p: TimmParams, in_channels: int) -> LoadReport:
    """Load the local weights file through timm's `load_pretrained` (see the module docstring)."""
    from timm.models import load_pretrained

    where = f"{WHERE}.weights"
    path = weights_path(p.weights, where)
    state = read_state_dict(path, where)
    convert = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)

    def filter_fn(state: dict, model: nn.Module) -> dict:
        try:
            return convert(state, model)
        except Exception as exc:  # timm's converters assume a checkpoint of their own model family
            check_state(model, state, str(path), where)  # the clear error, if the file does not fit at all
            raise CheckpointError(f"{where}: timm's checkpoint filter for {p.model} cannot convert {path}: "
                                  f"{type(exc).__name__}: {exc}") from exc

    cfg = {**model.pretrained_cfg, "state_dict": state, "source": ""}
    with watched_load(model, str(path), where) as reports:
        load_pretrained(model, pretrained_cfg=cfg, num_classes=0, in_chans=in_channels,
                        filter_fn=filter_fn if convert is not None else None, strict=False)
    return reports[-1]


def _normalization(model: nn.Module, p: TimmParams, in_channels: int) -> Optional[Normalization]:
    if p.mean is not None:
        return Normalization(tuple(p.mean), tuple(p.std), f"{WHERE}.mean/std").for_channels(in_channels)
    if not (p.pretrained or p.weights):
        return None
    cfg = model.pretrained_cfg
    source = f"timm pretrained_cfg of {cfg.get('architecture')}.{cfg.get('tag')}"
    if p.weights:
        source += (f", assumed for the weights file {p.weights} (set {WHERE}.mean and std if it was trained "
                   "with another normalisation)")
    return Normalization(tuple(cfg["mean"]), tuple(cfg["std"]), source).for_channels(in_channels)


def _layer_of(model: nn.Module) -> dict[int, int]:
    """Layer depth of each parameter (by identity): timm's `group_matcher` groups, as timm's own layer-decay
    optimiser uses them, or its automatic grouping for a model without one."""
    from timm.models import group_parameters
    from timm.optim import auto_group_layers

    if hasattr(model, "group_matcher"):
        by_name = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    else:
        by_name = auto_group_layers(model)
    top = max(by_name.values(), default=0)
    return {id(param): by_name.get(name, top) for name, param in model.named_parameters()}


def _enable_checkpointing(backbone: Backbone) -> None:
    if not backbone.stages:  # the whole model: timm's own switch
        try:
            backbone.stem.model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as exc:
            raise ConfigError(f"{WHERE}.grad_checkpointing: this timm model does not support it ({exc})") from exc
        return
    for stage in backbone.stages:
        stage.checkpointing = True
        for m in stage.modules():  # modules that checkpoint their own blocks (timm's set_grad_checkpointing)
            if hasattr(m, "grad_checkpointing"):
                m.grad_checkpointing = True


@BACKBONES.register("timm", params=TimmParams)
def timm_backbone(p: TimmParams, in_channels: int, image_size: int, load_weights: bool = True) -> Backbone:
    """Any timm model (`model`; pretrained from timm's hub or a local `weights` file), cut into stages."""
    from timm.models import get_pretrained_cfg

    name = model_name(p.model)
    kwargs = {**p.kwargs, "num_classes": 0, "in_chans": in_channels}
    if p.drop_path_rate is not None:
        kwargs["drop_path_rate"] = p.drop_path_rate
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size and "img_size" not in kwargs:
        kwargs["img_size"] = image_size  # position embeddings for this size (timm resamples pretrained ones)
    model = _create(name, p.pretrained and load_weights, kwargs)
    _check_image_size(model, name, image_size)
    report = None
    if p.pretrained and load_weights:
        hub = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url")
        report = LoadReport(f"timm's pretrained weights for {name} ({hub})", len(model.state_dict()))
    elif p.weights and load_weights:
        report = _load_file(model, p, in_channels)
    normalization = _normalization(model, p, in_channels)
    layer_of = _layer_of(model)
    backbone = cut(model, name, p.out_indices, in_channels, image_size)
    backbone.normalization, backbone.weights_report = normalization, report
    backbone.set_layers({n: layer_of[id(q)] for n, q in backbone.named_parameters()})
    if p.grad_checkpointing:
        _enable_checkpointing(backbone)
    return backbone
