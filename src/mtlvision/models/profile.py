"""Size and cost of every registered architecture on one backbone: parameters and forward FLOPs."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..errors import ConfigError
from ..tasks import Task
from ..registry import ARCHITECTURES, BACKBONES, HEADS
from .architectures import Architecture, ModelOutput
from .backbones import build_backbone


def forward_flops(model: Architecture, image: torch.Tensor) -> tuple[int, ModelOutput]:
    """FLOPs of one eval-mode forward pass (matmuls and convolutions, as FlopCounterMode counts them)
    and its output."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(image)
    return int(counter.get_total_flops()), out


def profile_architectures(backbone: dict[str, Any], tasks: int = 3, image_size: int = 32, classes: int = 10,
                          channels: int = 3) -> list[dict[str, Any]]:
    """One row per registered architecture (default parameters, linear heads) on `backbone` with `tasks` tasks.

    Row: name, parameters, shared (trunk) parameters, forward FLOPs per image, FLOPs relative to
    `hps`, and the size per image of the shared representation feature-space methods differentiate.
    A backbone spec error raises ConfigError naming the option; an architecture that cannot be built
    for this setting gets its error message in `error`.
    """
    for option, value, low in (("--tasks", tasks, 1), ("--image-size", image_size, 8), ("--classes", classes, 2),
                               ("--channels", channels, 1)):
        if value < low:
            raise ConfigError(f"{option}: expected >= {low}, got {value}")
    spec = BACKBONES.spec(backbone, "--backbone")  # a bad name or option fails here
    build_backbone(spec, channels, image_size, load_weights=False)
    task_list = [Task(f"task{i}", [str(c) for c in range(classes)]) for i in range(tasks)]
    image = torch.zeros(1, channels, image_size, image_size)
    rows = []
    for entry in ARCHITECTURES.entries():
        row: dict[str, Any] = {"architecture": entry.name, "description": entry.description}
        try:
            model = ARCHITECTURES.build(ARCHITECTURES.spec(entry.name, "model.architecture"),
                                        build_backbone(spec, channels, image_size, load_weights=False),
                                        task_list, HEADS.spec("linear", "model.head"))
        except ConfigError as exc:
            rows.append({**row, "error": str(exc)})
            continue
        shared = {id(p) for p in model.shared_parameters()}
        flops, out = forward_flops(model, image)
        row.update(parameters=sum(p.numel() for p in model.parameters()),
                   shared_parameters=sum(p.numel() for p in model.parameters() if id(p) in shared),
                   flops=flops, shared_size=sum(s[0].numel() for s in out.shared))
        rows.append(row)
    base = next((r["flops"] for r in rows if r["architecture"] == "hps" and "flops" in r), None)
    for r in rows:
        if "flops" in r:
            r["relative_flops"] = r["flops"] / base if base else None
    return rows
