"""Cutting a timm model into stem -> stages -> pool at the feature levels its `feature_info` names.

* Convolutional models whose `forward_features` is a chain of modules (ResNet, ConvNeXt, EfficientNet,
  MobileNet, RegNet, ...): the chain is read by recording which modules `forward_features` calls, in
  order (forward pre-hooks on the model's children, the containers of its feature modules opened). The
  stem is every module before the first chosen level's module, stage j runs up to level j's module, and
  the pool is the rest of `forward_features` (e.g. EfficientNet's conv_head) then timm's own
  `forward_head(x, pre_logits=True)` on what is left of the model.
* Vision transformers (timm's `VisionTransformer`, DeiT included): the stem is timm's patch embedding,
  position embedding and prefix tokens (`patch_embed`, `_pos_embed`, `patch_drop`, `norm_pre`), the
  stages are consecutive groups of blocks (tokens (B, N, C) in and out), the pool the final norm and
  `forward_head(pre_logits=True)`.

Every cut is checked once at build time on a probe batch: each stage output must equal timm's own
`forward_intermediates` at that level, and the pooled features `forward_head(forward_features(x),
pre_logits=True)`. A model that cannot be cut (its `forward_features` is not a chain, or the check
fails) is used whole, with no stages: hard sharing and task-features work on it, and the architectures
that act between stages refuse it naming the reason (`Backbone.require_stages`).
"""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...errors import ConfigError
from .base import Backbone

_VIT_STEM = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")


class Stage(nn.Sequential):
    """Modules run in sequence. With `checkpointing` (training with gradients), each module's activations
    are recomputed in the backward pass (torch.utils.checkpoint), except modules that checkpoint their own
    blocks once timm's `set_grad_checkpointing` enabled it (e.g. a ConvNeXt stage)."""

    checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        recompute = self.checkpointing and self.training and torch.is_grad_enabled()
        for module in self:
            if recompute and not getattr(module, "grad_checkpointing", False):
                x = checkpoint(module, x, use_reentrant=False)
            else:
                x = module(x)
        return x


class Head(nn.Module):
    """The end of timm's `forward_features` (`tail`), then `forward_head(x, pre_logits=True)` of `model`,
    which keeps only its head modules (global pooling, pre-logits norm or MLP; the classifier is Identity)."""

    def __init__(self, tail: list[tuple[str, nn.Module]], model: nn.Module) -> None:
        super().__init__()
        self.tail, self.model = Stage(OrderedDict(tail)), model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.tail(x), pre_logits=True)


class VitStem(nn.Module):
    """A vision transformer's patch embedding, prefix tokens and position embedding: timm's own code on
    a shallow copy of the model that keeps only those parts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        return m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))


class Whole(nn.Module):
    """The whole model, for one that cannot be cut: forward_head(forward_features(x), pre_logits=True)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def default_levels(levels: list[dict], tokens: bool) -> list[int]:
    """Feature levels that end stages: for hierarchical models every level at stride >= 4 (a stride-2
    level joins the stem); for models whose levels share one stride (transformer blocks), the last block
    of each of up to four consecutive groups, the first ones one block longer."""
    reductions = {f["reduction"] for f in levels}
    if not levels:
        return []
    if not tokens and len(reductions) > 1:
        return [i for i, f in enumerate(levels) if f["reduction"] >= 4]
    groups = min(4, len(levels))
    q, r = divmod(len(levels), groups)
    ends, end = [], -1
    for j in range(groups):
        end += q + (j < r)
        ends.append(end)
    return ends


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


@contextlib.contextmanager
def _recording(model: nn.Module, level_modules: list[str]) -> Iterator[list[str]]:
    """Within the block, the names of the modules the model calls are appended to the yielded list, at the
    granularity of the model's children with the containers of the feature modules opened."""
    opened = {""} | {name.rsplit(".", k)[0] for name in level_modules for k in range(1, name.count(".") + 1)}
    candidates = {(f"{p}.{c}" if p else c): m for p in opened for c, m in model.get_submodule(p).named_children()}
    calls: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, name=name: calls.append(name))
             for name, m in candidates.items() if name not in opened]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _matches(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def _intermediates(model: nn.Module, probe: torch.Tensor, ends: list[int], tokens: bool) -> Optional[list]:
    """timm's own outputs at the chosen feature levels (patch tokens (B, N, C) for a ViT), or None if the
    model has no `forward_intermediates`."""
    if not hasattr(model, "forward_intermediates"):
        return None
    fmt = {"output_fmt": "NLC"} if tokens else {}
    with torch.no_grad():
        return model.forward_intermediates(probe, indices=ends, intermediates_only=True, **fmt)


def cut(model: nn.Module, name: str, out_indices: Optional[list[int]], in_channels: int,
        image_size: int) -> Backbone:
    """The Backbone for timm model `model` (created with num_classes=0), cut at `out_indices` (indices into
    its `feature_info`; None: `default_levels`). The model's modules are moved into the Backbone."""
    from timm.models.vision_transformer import VisionTransformer

    model.eval()
    probe = torch.randn(1, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0))
    levels = list(getattr(model, "feature_info", None) or [])
    kind, tokens = type(model).__name__, isinstance(model, VisionTransformer)
    ends = default_levels(levels, tokens) if out_indices is None else list(out_indices)
    if levels and (not ends or ends != sorted(set(ends)) or not 0 <= ends[0] <= ends[-1] < len(levels)):
        raise ConfigError(f"model.backbone.out_indices: expected increasing indices in 0..{len(levels) - 1} "
                          f"(the feature levels of {name}: {[f['module'] for f in levels]}), got {out_indices}")
    names = [levels[i]["module"] for i in ends] if levels else []
    try:
        with torch.no_grad(), _recording(model, names) as calls:
            features = model.forward_features(probe)
        with torch.no_grad():
            pooled = model.forward_head(features, pre_logits=True)
    except RuntimeError as exc:
        most = f" (it reduces them up to {levels[-1]['reduction']}x)" if levels else ""
        raise ConfigError(f"model.backbone: timm model {name!r} cannot take {image_size} px images{most}: "
                          f"{str(exc).splitlines()[0]}") from exc
    parts, reason = None, f"timm model {name!r} ({kind}) has no feature_info"
    if levels:
        parts = _vit_parts(model, names) if tokens else _chain_parts(model, names, calls)
        reason = f"timm model {name!r} ({kind}): its forward_features is not a chain of modules mtlvision can split"
        if parts is not None and not _reproduces(model, parts, probe, ends, tokens, pooled):
            parts, reason = None, f"timm model {name!r} ({kind}): the cut stages do not reproduce its forward_features"
    model.train()
    if parts is None:
        return Backbone(Whole(model), [], nn.Identity(), pooled.shape[1], input_shape=(in_channels, image_size),
                        unstaged=reason)
    stem, stages, tail, moved = parts
    for module_name in moved:  # each module lives in the Backbone once: the model keeps its head only
        _replace(model, module_name, nn.Identity())
    for param in ("cls_token", "reg_token", "pos_embed") if tokens else ():
        if param in model._parameters:
            model._parameters[param] = None
    return Backbone(stem, stages, Head(list(tail.named_children()), model), pooled.shape[1],
                    layout="tokens" if tokens else "spatial", input_shape=(in_channels, image_size))


def _reproduces(model: nn.Module, parts: tuple, probe: torch.Tensor, ends: list[int], tokens: bool,
                pooled: torch.Tensor) -> bool:
    """Whether the cut model's stage outputs equal timm's `forward_intermediates` at the chosen levels
    (without a ViT's prefix tokens) and its pooled features `pooled`."""
    stem, stages, tail, _ = parts
    want = _intermediates(model, probe, ends, tokens)
    with torch.no_grad():
        x = stem(probe)
        for j, stage in enumerate(stages):
            x = stage(x)
            if want is not None and not _matches(x[:, model.num_prefix_tokens:] if tokens else x, want[j]):
                return False
        return _matches(model.forward_head(tail(x), pre_logits=True), pooled)


def _key(name: str) -> str:
    return name.replace(".", "__")  # module names in a Sequential cannot hold dots


def _chain_parts(model: nn.Module, names: list[str], chain: list[str]):
    """(stem, stages, tail, names of the modules they take) of a model whose `forward_features` called the
    modules `chain` in this order, or None if it called one twice or did not call a feature module."""
    if len(chain) != len(set(chain)) or any(n not in chain for n in names):
        return None
    bounds = [chain.index(n) for n in names]
    modules = [(_key(n), model.get_submodule(n)) for n in chain]
    starts = [bounds[0]] + [b + 1 for b in bounds[:-1]]
    stages = [Stage(OrderedDict(modules[a:b + 1])) for a, b in zip(starts, bounds)]
    return Stage(OrderedDict(modules[:bounds[0]])), stages, Stage(OrderedDict(modules[bounds[-1] + 1:])), chain


def _vit_parts(model: nn.Module, names: list[str]):
    """Stem: a shallow copy of the model owning only the embedding parts; stages: groups of blocks."""
    stem_model = copy.copy(model)
    stem_model._modules = OrderedDict((k, m if k in _VIT_STEM else nn.Identity()) for k, m in model._modules.items())
    stem_model._parameters, stem_model._buffers = OrderedDict(model._parameters), OrderedDict(model._buffers)
    ends = [int(n.rsplit(".", 1)[1]) for n in names]
    blocks = list(model.blocks.named_children())
    stages = [Stage(OrderedDict((f"blocks__{k}", b) for k, b in blocks[a + 1:e + 1]))
              for a, e in zip([-1] + ends, ends)]
    tail = Stage(OrderedDict([*((f"blocks__{k}", b) for k, b in blocks[ends[-1] + 1:]), ("norm", model.norm)]))
    return VitStem(stem_model), stages, tail, [*_VIT_STEM, "blocks", "norm"]
