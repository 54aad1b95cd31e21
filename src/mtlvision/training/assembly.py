"""The composition root: one config becomes every part a training run is made of, in one place.

    config -> data (input groups, tasks, normalisation) -> model -> balancer -> optimiser + schedule
           -> loaders (one per input group) -> the training forward

What the balancer needs from the model is fixed here: a feature-space gradient method differentiates
each task's loss at the shared tensors, so the training forward is `model(x, split=True)` for it and
the plain forward otherwise. The input normalisation is decided here too: the backbone's declared one
(pretrained weights) or the training images' own statistics, recorded in the input spec that
checkpoints carry to resume, evaluate, predict and export.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from ..balancing import Balancer, build_balancer
from ..config import Config
from ..data import DataBundle, build_data
from ..data.loader import BatchAugment, Normalize, TensorImages, TrainLoader
from ..data.stream import StreamLoader
from ..errors import ConfigError
from ..models import Architecture, ModelOutput, build_model
from ..tasks import Task
from .finetune import FineTuning
from .optim import build_optimizer, build_scheduler
from .runtime import Runtime

Split = list[tuple[TensorImages, list[str]]]  # (images, the tasks they label) per input group


@dataclasses.dataclass
class Parts:
    """Everything a training run is made of, built once from its config by `assemble`."""

    cfg: Config
    data: DataBundle
    tasks: list[Task]
    model: Architecture
    forward: Callable[[torch.Tensor], ModelOutput]  # the training forward (split at the cut when needed)
    balancer: Balancer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loaders: list  # one TrainLoader or StreamLoader per input group
    normalize: Normalize
    input_spec: dict[str, Any]  # mean, std, image_shape and where the normalisation comes from
    val_sets: Split
    test_sets: Split
    steps: int  # optimisation steps per epoch
    finetune: FineTuning  # backbone freezing, frozen BatchNorm statistics, EMA of the weights
    shared_params: list[torch.nn.Parameter]
    task_params: list[torch.nn.Parameter]
    averaged: list[torch.nn.Parameter]  # gradients averaged over ranks after each backward


def input_spec(data: DataBundle, model: Architecture) -> dict[str, Any]:
    """The normalisation the run uses: the backbone's (pretrained weights) or the training images' statistics."""
    declared = model.backbone.normalization
    c = data.image_shape[-1]
    if declared is not None:
        if len(declared.mean) != c:
            raise ConfigError(f"model.backbone: its normalisation ({declared.source}) is for {len(declared.mean)} "
                              f"channel(s), the images have {c}; set data.channels: {len(declared.mean)}")
        return {"mean": list(declared.mean), "std": list(declared.std), "image_shape": list(data.image_shape),
                "normalization": f"backbone: {declared.source}"}
    return {"mean": data.mean, "std": data.std, "image_shape": list(data.image_shape),
            "normalization": "dataset statistics (training images)"}


def assemble(cfg: Config, rt: Runtime, load_weights: bool = True) -> Parts:
    """Build data, model, balancer, optimiser, schedule and loaders for `cfg` on the runtime's device
    (`load_weights=False`: a pretrained backbone without its weights, which a checkpoint replaces)."""
    tc, d, device = cfg.train, cfg.data, rt.device
    torch.manual_seed(cfg.seed)
    data = build_data(cfg)
    model = build_model(cfg.model, data.tasks, data.image_shape, load_weights=load_weights).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    balancer = build_balancer(cfg.balancing, data.tasks).to(device)
    compiled = torch.compile(model) if tc.compile else model
    if balancer.needs_shared_features:  # feature-space gradient methods differentiate at the cut
        def forward(x: torch.Tensor) -> ModelOutput:
            return compiled(x, split=True)
    else:
        forward = compiled
    spec = input_spec(data, model)
    normalize = Normalize(spec["mean"], spec["std"], device, tc.channels_last)
    val_sets = [(TensorImages(g.val, device), g.tasks) for g in data.groups]
    test_sets = [(TensorImages(g.test, device), g.tasks) for g in data.groups]
    loaders: list = []
    for i, g in enumerate(data.groups):
        flip = d.augment.flip and g.flip
        augment = BatchAugment(d.augment.crop_padding, flip) if (flip or d.augment.crop_padding) else None
        if g.streamed is not None:
            loaders.append(StreamLoader(g.streamed, d.batch_size, cfg.seed, i, augment, rt.dist.rank,
                                        rt.dist.world_size, device, tc.epochs))
        else:
            loaders.append(TrainLoader(TensorImages(g.train, device), d.batch_size, cfg.seed, i, augment,
                                       rt.dist.rank, rt.dist.world_size))
    steps = max(ld.natural_steps for ld in loaders)
    shared, task = model.shared_parameters(), model.task_parameters()
    # gradients averaged over ranks after each backward (not the trunk's when the method did it)
    averaged = [*task, *balancer.parameters(), *([] if balancer.shared_grads_reduced else shared)]
    if balancer.needs_probe and any(g.streamed is not None for g in data.groups):
        raise ConfigError(f"balancing.method: {cfg.balancing.name!r} draws extra mini-batches, which a training "
                          "split streamed from shards (stream: true) cannot give; decode it into the cache instead")
    optimizer = build_optimizer(tc, model, list(balancer.parameters()), cfg.finetune)
    scheduler = build_scheduler(tc, optimizer, steps)
    return Parts(cfg, data, data.tasks, model, forward, balancer, optimizer, scheduler, loaders, normalize, spec,
                 val_sets, test_sets, steps, FineTuning(cfg.finetune, model), shared, task, averaged)
