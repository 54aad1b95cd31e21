"""The backbone interface: a shared trunk mapping images (B, C, H, W) to a feature vector (B, out_dim).

Every backbone has the same shape, `stem` -> `stages` (a ModuleList) -> `pool`, so an architecture
that needs to act between stages (MTAN, cross-stitch, the mixture-of-experts family) is written once
for all backbones. Stage outputs are feature maps (B, C, H, W) (`layout` "spatial") or token sequences
(B, N, C) (`layout` "tokens": vision transformers, whose blocks keep N constant). A backbone that could
not be cut into stages has none (`stages` empty, `unstaged` says why): its stem computes the whole
feature vector, and the architectures that act between stages refuse it (`require_stages`).

A backbone whose weights were trained on normalised inputs (pretrained ones) declares that
normalisation in `normalization`; None means "standardise with the dataset's own per-channel
statistics" (from-scratch backbones). `layer_ids()` gives each parameter's depth for layer-wise
learning-rate decay.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import nn

from ...errors import ConfigError
from ...registry import BACKBONES, Spec


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation (x / 255 - mean) / std on the 0..1 scale, and where it comes from."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # e.g. "timm pretrained_cfg of efficientnet_lite0", "torchvision IMAGENET1K_V1"

    def for_channels(self, channels: int) -> "Normalization":
        """The same normalisation for `channels` input channels: RGB statistics averaged for other counts
        (the weights of the first convolution are adapted the same way, see timm's `adapt_input_conv`)."""
        if channels == len(self.mean):
            return self
        if len(self.mean) != 3:
            raise ConfigError(f"input normalisation from {self.source} has {len(self.mean)} channels; "
                              f"the data has {channels}")
        mean, std = sum(self.mean) / 3, sum(self.std) / 3
        return Normalization((mean,) * channels, (std,) * channels,
                             f"{self.source}, averaged over RGB for {channels}-channel input")


Layout = Literal["spatial", "tokens"]


class Backbone(nn.Module):
    """stem -> stages -> pool; `out_dim` is the size of the pooled feature vector.

    `input_shape` (channels, size) is what the backbone was built for (dummy forwards probe with it);
    `layers` maps parameter names to layer depths (None: stem 0, stage k k + 1, pool len(stages) + 1).
    """

    out_dim: int

    def __init__(self, stem: nn.Module, stages: list[nn.Module], pool: nn.Module, out_dim: int,
                 normalization: Optional[Normalization] = None, *, layout: Layout = "spatial",
                 input_shape: Optional[tuple[int, int]] = None, layers: Optional[dict[str, int]] = None,
                 unstaged: str = "") -> None:
        super().__init__()
        self.stem, self.stages, self.pool, self.out_dim = stem, nn.ModuleList(stages), pool, out_dim
        self.normalization = normalization
        self.layout, self.input_shape, self.unstaged = layout, input_shape, unstaged
        self._layers = layers
        self._num_layers: Optional[int] = None  # set by `bottom`: the full backbone's count
        self.weights_report = None  # a weights.LoadReport when the factory loaded weights

    @property
    def channel_dim(self) -> int:
        """The dimension of a stage output that holds channels: 1 for (B, C, H, W), -1 for (B, N, C)."""
        return 1 if self.layout == "spatial" else -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.pool(x)

    def require_stages(self, architecture: str) -> None:
        """A ConfigError unless the backbone was cut into stages (for architectures acting between them)."""
        if not self.stages:
            raise ConfigError(f"model.architecture: {architecture} needs a backbone cut into stages, and this one "
                              f"is not ({self.unstaged or 'it has none'}); architectures that work on it: hps, "
                              "task-features, cross-stitch")

    def _probe_input(self, probe_size: Optional[int]) -> torch.Tensor:
        param = next(self.parameters())
        if self.input_shape is not None:
            channels, size = self.input_shape
        else:
            conv = next((m for m in self.modules() if isinstance(m, nn.Conv2d)), None)
            if conv is None:
                raise TypeError("the backbone declares no input_shape and has no Conv2d to read its channels from")
            channels, size = conv.in_channels, 64
        size = probe_size or size
        return torch.zeros(2, channels, size, size, device=param.device, dtype=param.dtype)

    def channels(self, probe_size: Optional[int] = None) -> list[int]:
        """Channels of the stem's output and of each stage's output, probed with one dummy forward in eval
        mode (running statistics untouched); for architectures that build modules between the stages."""
        x = self._probe_input(probe_size)
        was_training, out = self.training, []
        self.eval()
        try:
            with torch.no_grad():
                x = self.stem(x)
                out.append(x.shape[self.channel_dim])
                for stage in self.stages:
                    x = stage(x)
                    out.append(x.shape[self.channel_dim])
        finally:
            self.train(was_training)
        return out

    def stage_channels(self, probe_size: Optional[int] = None) -> list[int]:
        """Channels of each stage's output (see `channels`)."""
        return self.channels(probe_size)[1:]

    def bottom(self, split: int) -> "Backbone":
        """stem + stages[:split] with no pool (the same modules, not copies): a feature map or token
        sequence; its `out_dim` is its output channels. Normalisation, layout and layer depths carry over."""
        out_dim = self.channels()[split]
        keep = ("stem.", *(f"stages.{j}." for j in range(split)))
        layers = {k: v for k, v in self.layer_ids().items() if k.startswith(keep)}
        bottom = Backbone(self.stem, list(self.stages[:split]), nn.Identity(), out_dim, self.normalization,
                          layout=self.layout, input_shape=self.input_shape, layers=layers, unstaged=self.unstaged)
        bottom._num_layers = self.num_layers
        return bottom

    def set_layers(self, layers: dict[str, int]) -> None:
        """Declare each parameter's layer depth (every parameter name of this module, depths from 0)."""
        names = {n for n, _ in self.named_parameters()}
        if set(layers) != names or min(layers.values(), default=0) < 0:
            raise ValueError(f"set_layers: expected a depth >= 0 for each of the {len(names)} parameters, got "
                             f"{len(layers)} names ({len(names - set(layers))} missing)")
        self._layers = dict(layers)

    def layer_ids(self) -> dict[str, int]:
        """Each parameter's layer depth, by its name in this module: 0 at the input, `num_layers - 1` at the
        output (for layer-wise learning-rate decay: lr * decay ** (num_layers - 1 - depth))."""
        if self._layers is not None:
            return dict(self._layers)
        depth = {"stem": 0, "pool": len(self.stages) + 1}
        return {name: depth[name.split(".")[0]] if not name.startswith("stages.") else int(name.split(".")[1]) + 1
                for name, _ in self.named_parameters()}

    @property
    def num_layers(self) -> int:
        """Number of layer depths `layer_ids` uses."""
        if self._num_layers is not None:
            return self._num_layers
        if self._layers is not None:
            return max(self._layers.values(), default=-1) + 1
        return len(self.stages) + 2


def build_backbone(spec: Spec | dict, in_channels: int, image_size: int, load_weights: bool = True) -> Backbone:
    """The backbone a spec (or a mapping with its `name`) describes, for images of `in_channels` x `image_size`².

    `load_weights=False` builds a pretrained backbone's architecture without fetching or reading its weights
    (the caller loads a checkpoint's state dict instead); its declared normalisation is the same.
    """
    return BACKBONES.build(BACKBONES.spec(spec, "model.backbone"), in_channels, image_size, load_weights=load_weights)
