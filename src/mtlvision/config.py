"""The run configuration: typed sections, YAML loading, `--set key.path=value` overrides.

Pluggable parts (data source, backbone, architecture, balancing method) are written as a mapping with a
`name` (or `method`) key plus that part's own parameters, which its registry entry validates.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import ConfigError
from .schema import parse, to_dict


@dataclasses.dataclass
class AugmentConfig:
    crop_padding: int = 4
    flip: bool = True  # applied only when every task allows horizontal flips
    normalize: bool = True


@dataclasses.dataclass
class DeriveConfig:
    """A task derived from another by grouping its classes (unlisted classes become missing)."""

    source: str
    groups: dict[str, list[str]]
    flip_ok: bool = True


@dataclasses.dataclass
class DataConfig:
    source: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "shapes"})
    # multi-input: one source per task group, one batch per task each step
    sources: Optional[dict[str, dict[str, Any]]] = None
    image_size: Optional[int] = None  # resize once at cache time; None keeps the source's size
    channels: Optional[int] = None  # 1 or 3; None keeps the source's channels
    val_fraction: float = 0.1
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    cache: bool = True  # decode once into a uint8 .npy cache reused across runs
    cache_dir: Optional[str] = None  # default: $MTLVISION_CACHE or ~/.cache/mtlvision
    derive: dict[str, "DeriveConfig"] = dataclasses.field(default_factory=dict)
    limit_train: Optional[int] = None  # use the first N training images (quick runs)
    limit_test: Optional[int] = None


@dataclasses.dataclass
class TaskOverride:
    enabled: bool = True
    label_smoothing: float = 0.0
    weight: float = 1.0


@dataclasses.dataclass
class ModelConfig:
    backbone: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "resnet18"})
    architecture: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "task-features"})
    head: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "linear"})


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 10
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_epochs: float = 0.0
    grad_clip: Optional[float] = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = True
    compile: bool = False
    threads: Optional[int] = None
    deterministic: bool = True
    log_every: int = 20  # steps between progress/TensorBoard updates


@dataclasses.dataclass
class BaselineConfig:
    single_task: bool = False  # also train one single-task model per task with the same budget
    runs: dict[str, str] = dataclasses.field(default_factory=dict)  # task -> STL run dir, for delta_m


@dataclasses.dataclass
class Config:
    name: str = "run"
    seed: int = 0
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    tasks: dict[str, TaskOverride] = dataclasses.field(default_factory=dict)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    balancing: dict[str, Any] = dataclasses.field(default_factory=lambda: {"method": "equal"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    baselines: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _expand(value: Any) -> Any:
    """Expand ${VAR} / ${VAR:-default} and ~ in string values."""
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, str) and "$" in value:
        import re

        def sub(m: re.Match) -> str:
            name, default = m.group(1), m.group(3)
            return os.environ.get(name, default if default is not None else m.group(0))

        return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", sub, value)
    return value


def set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c=value` inside nested dicts, creating mappings on the way."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a mapping")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        set_path(data, key.strip(), yaml.safe_load(raw))
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> Config:
    """Load a YAML file (or a dict), apply overrides, validate; relative data paths are kept as given."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    if data is not None:
        raw = {**raw, **copy.deepcopy(data)}
    # defaults first, so `--set model.backbone.width=0.5` keeps the default backbone's name
    raw = apply_overrides(_merge(Config().to_dict(), raw), overrides or [])
    return parse(Config, _expand(raw), "")


def save_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
