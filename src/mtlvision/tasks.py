"""A Task is one classification problem the network learns: its classes, loss and metrics."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .errors import DataError

MISSING = -1  # label value meaning "not labelled for this task": masked out of loss and metrics


@dataclasses.dataclass
class Task:
    """Name, class names and loss settings of one task.

    `kind` is "binary" for two-class attributes (reported with balanced accuracy too) and
    "multiclass" otherwise. `flip_ok` says whether a horizontal flip keeps the label valid. Fixed
    task weights belong to the balancing method (`balancing: {method: fixed, weights: ...}`).
    """

    name: str
    classes: list[str]
    kind: Literal["multiclass", "binary"] = "multiclass"
    label_smoothing: float = 0.0
    flip_ok: bool = True

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise DataError(f"task name {self.name!r}: must be non-empty and contain no '.'")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise DataError(f"task {self.name!r}: label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if len(self.classes) < 2:
            raise DataError(f"task {self.name!r} needs at least 2 classes, got {self.classes}")
        if self.kind not in ("multiclass", "binary"):
            raise DataError(f"task {self.name!r}: kind must be multiclass or binary, got {self.kind!r}")
        if self.kind == "binary" and len(self.classes) != 2:
            raise DataError(f"task {self.name!r}: a binary task has 2 classes, got {len(self.classes)}")
        if len(self.classes) == 2:
            self.kind = "binary"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def metric_names(self) -> list[str]:
        names = ["accuracy"]
        if self.num_classes >= 10:
            names.append("top5")
        if self.kind == "binary":
            names.append("balanced_accuracy")
        return names

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over labelled samples (label -1 is ignored; 0 if none is labelled)."""
        labelled = labels != MISSING
        ce = F.cross_entropy(logits.float(), labels, ignore_index=MISSING,
                             label_smoothing=self.label_smoothing, reduction="sum")
        # dividing by max(count, 1) keeps the graph (and a 0 loss) for an all-missing batch
        return ce / labelled.sum().clamp(min=1)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        return cls(**data)
