"""The run configuration: typed sections, YAML loading, `--set key.path=value` overrides.

Pluggable parts (data source, backbone, architecture, head, balancing method) are written as a mapping
with a `name` (balancing: `method`) key plus that part's own parameters. Each is parsed once, here, by its
registry into a typed `Spec` (see registry.py); this module imports no part itself.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml

from .errors import ConfigError
from .registry import ARCHITECTURES, BACKBONES, HEADS, METHODS, SOURCES, Spec
from .schema import parse, to_dict

SourceSpec = Annotated[Spec, SOURCES.spec]
BackboneSpec = Annotated[Spec, BACKBONES.spec]
ArchitectureSpec = Annotated[Spec, ARCHITECTURES.spec]
HeadSpec = Annotated[Spec, HEADS.spec]
MethodSpec = Annotated[Spec, METHODS.spec]

# the defaults of every pluggable part, stated once
DEFAULT_SOURCE, DEFAULT_BACKBONE, DEFAULT_ARCHITECTURE = "shapes", "resnet18", "task-features"
DEFAULT_HEAD, DEFAULT_METHOD = "linear", "equal"
FLOAT32_MAX = 3.4028234663852886e38
# a run name is one path component (the default output is runs/<name>)
_NAME = re.compile(r"[^/\\\x00-\x1f]+")


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
    source: Optional[SourceSpec] = None  # default: the shapes source (unless `sources` is given)
    # multi-input: one source per input group, one batch of each group every step
    sources: Optional[dict[str, SourceSpec]] = None
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
    drop_unlabelled: bool = False  # leave out images that no enabled task labels (e.g. single-task baselines)
    limit_test: Optional[int] = None

    def __post_init__(self) -> None:
        _check(0 < self.val_fraction < 1, "data.val_fraction", "a value in (0, 1)", self.val_fraction)
        _check(self.batch_size > 0, "data.batch_size", "> 0", self.batch_size)
        _check(self.eval_batch_size > 0, "data.eval_batch_size", "> 0", self.eval_batch_size)
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            _check(value is None or value > 0, f"data.{key}", "> 0 or null", value)
        if self.sources:
            self.source = None  # multi-input: `source` is not used
            self.sources = {k: SOURCES.spec(v, f"data.sources.{k}") for k, v in self.sources.items()}
        else:
            self.sources = None
            self.source = SOURCES.spec(self.source if self.source is not None else DEFAULT_SOURCE, "data.source")

    def source_specs(self) -> dict[str, Spec]:
        """Input group name -> its source: {"main": source} or the multi-input `sources`."""
        if self.sources:
            return {k: SOURCES.spec(v, f"data.sources.{k}") for k, v in self.sources.items()}
        return {"main": SOURCES.spec(self.source, "data.source")}


@dataclasses.dataclass
class TaskOverride:
    enabled: bool = True
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(0 <= self.label_smoothing < 1, "tasks.*.label_smoothing", "in [0, 1)", self.label_smoothing)


@dataclasses.dataclass
class ModelConfig:
    backbone: BackboneSpec = DEFAULT_BACKBONE
    architecture: ArchitectureSpec = DEFAULT_ARCHITECTURE
    head: HeadSpec = DEFAULT_HEAD

    def __post_init__(self) -> None:  # names and mappings given in code become specs too
        self.backbone = BACKBONES.spec(self.backbone, "model.backbone")
        self.architecture = ARCHITECTURES.spec(self.architecture, "model.architecture")
        self.head = HEADS.spec(self.head, "model.head")


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
        _check(0 < self.lr <= FLOAT32_MAX, "train.lr", "> 0 (and at most 3.4e38, float32)", self.lr)
        _check(self.weight_decay <= FLOAT32_MAX, "train.weight_decay", "at most 3.4e38 (float32)",
               self.weight_decay)
        _check(self.weight_decay >= 0, "train.weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.momentum < 1, "train.momentum", "in [0, 1)", self.momentum)
        _check(self.warmup_epochs >= 0, "train.warmup_epochs", ">= 0", self.warmup_epochs)
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "> 0 or null", self.grad_clip)
        _check(self.threads is None or self.threads > 0, "train.threads", "> 0 or null", self.threads)
        _check(self.log_every >= 1, "train.log_every", ">= 1", self.log_every)


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning controls for pretrained backbones (they apply to any backbone)."""

    backbone_lr: float = 1.0  # learning-rate multiplier of the backbone's parameters against the rest
    layer_decay: Optional[float] = None  # per backbone layer from the top: lr * decay ** (layers - 1 - depth)
    freeze_backbone_epochs: int = 0  # first N epochs: backbone frozen and in eval mode (a linear probe)
    freeze_bn: bool = False  # BatchNorm layers in eval mode throughout (statistics frozen, affine weights train)
    ema: Optional[float] = None  # decay of an exponential moving average of the weights, evaluated and saved

    def __post_init__(self) -> None:
        _check(0 <= self.backbone_lr <= FLOAT32_MAX, "finetune.backbone_lr", ">= 0", self.backbone_lr)
        _check(self.layer_decay is None or 0 < self.layer_decay <= 1, "finetune.layer_decay", "in (0, 1] or null",
               self.layer_decay)
        _check(self.freeze_backbone_epochs >= 0, "finetune.freeze_backbone_epochs", ">= 0",
               self.freeze_backbone_epochs)
        _check(self.ema is None or 0 < self.ema < 1, "finetune.ema", "in (0, 1) or null", self.ema)


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
    balancing: MethodSpec = DEFAULT_METHOD
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    baselines: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)

    def __post_init__(self) -> None:
        if not (_NAME.fullmatch(self.name) and self.name not in (".", "..")):
            raise ConfigError(f"name: {self.name!r} is not allowed: a run name is one folder name under runs/ "
                              "(no '/', '\\', control characters, '.' or '..'); give --out for another place")
        self.balancing = METHODS.spec(self.balancing, "balancing")
        _check(self.finetune.freeze_backbone_epochs <= self.train.epochs, "finetune.freeze_backbone_epochs",
               f"at most train.epochs ({self.train.epochs})", self.finetune.freeze_backbone_epochs)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _expand(value: Any) -> Any:
    """Expand ${VAR} / ${VAR:-default} and ~ in string values."""
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, str) and "$" in value:
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
    raw = apply_overrides(_merge(_skeleton(), raw), overrides or [])
    return parse(Config, _expand(raw), "")


def _skeleton() -> dict[str, Any]:
    """The defaults as a config mapping, each pluggable part reduced to its name: a config that names
    another part must not inherit the default part's parameters."""
    out = Config().to_dict()
    out["data"]["source"] = None
    out["model"] = {k: {"name": v["name"]} for k, v in out["model"].items()}
    out["balancing"] = {"method": out["balancing"]["method"]}
    return out


def as_config(config: "Config | dict[str, Any] | str | os.PathLike") -> Config:
    """A Config from a Config (returned as it is), a config dict or a YAML path."""
    if isinstance(config, Config):
        return config
    return load_config(data=config) if isinstance(config, dict) else load_config(config)


def save_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
