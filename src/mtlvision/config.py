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


def _check(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {value!r}")


@dataclasses.dataclass
class AugmentConfig:
    crop_padding: int = 4
    flip: bool = True  # applied only when every task allows horizontal flips

    def __post_init__(self) -> None:
        _check(self.crop_padding >= 0, "data.augment.crop_padding", ">= 0", self.crop_padding)


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
    limit_train: Optional[int] = None  # a seeded random subset of N training images (quick runs)
    limit_test: Optional[int] = None

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction < 1, "data.val_fraction", "a value in (0, 1)", self.val_fraction)
        _check(self.batch_size > 0, "data.batch_size", "> 0", self.batch_size)
        _check(self.eval_batch_size > 0, "data.eval_batch_size", "> 0", self.eval_batch_size)
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", "> 0 or null", value)
        _check(self.source is not None or self.sources, "data.source", "a source mapping", self.source)


@dataclasses.dataclass
class TaskOverride:
    enabled: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.label_smoothing < 1, "tasks.*.label_smoothing", "in [0, 1)", self.label_smoothing)


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
    decay_norms: bool = False  # also decay norm weights and biases (1-D parameters)
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

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        _check(self.lr > 0, "train.lr", "> 0", self.lr)
        _check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.momentum < 1, "train.momentum", "in [0, 1)", self.momentum)
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", ">= 0", self.warmup_epochs)
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "> 0 or null", self.grad_clip)
        _check(self.threads is None or self.threads > 0, "train.threads", "> 0 or null", self.threads)
        _check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)


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
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"--set {dotted}: {k!r} is not a mapping")
        node = node[k]
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
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        set_path(data, key.strip(), value)
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
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML (or not UTF-8): {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
    if data is not None:
        raw = {**raw, **copy.deepcopy(data)}
    # defaults first, so `--set model.backbone.width=0.5` keeps the default backbone's name
    raw = apply_overrides(_merge(Config().to_dict(), raw), overrides or [])
    cfg = parse(Config, _expand(raw), "")
    validate_components(cfg)
    return cfg


def validate_components(cfg: Config) -> None:
    """Check every pluggable part's name and parameters now, before any data is decoded."""
    from .balancing import METHODS
    from .data.sources import SOURCES
    from .models import ARCHITECTURES, BACKBONES, HEADS

    parts = [(BACKBONES, "model.backbone", cfg.model.backbone, "name"),
             (ARCHITECTURES, "model.architecture", cfg.model.architecture, "name"),
             (HEADS, "model.head", cfg.model.head, "name"), (METHODS, "balancing", cfg.balancing, "method")]
    sources = {"data.source": cfg.data.source} if not cfg.data.sources else {
        f"data.sources.{k}": v for k, v in cfg.data.sources.items()}
    parts += [(SOURCES, where, spec, "name") for where, spec in sources.items()]
    for registry, where, spec, key in parts:
        if key not in spec:
            raise ConfigError(f"{where}.{key}: required key is missing; valid: {', '.join(registry.names())}")
        registry.parse_params(spec[key], {k: v for k, v in spec.items() if k != key}, where)


def as_config(config: "Config | dict[str, Any] | str | os.PathLike") -> Config:
    """A Config from a Config, a config dict or a YAML path."""
    if isinstance(config, Config):
        validate_components(config)
        return config
    return load_config(data=config) if isinstance(config, dict) else load_config(config)


def save_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
