"""Per-task metrics from a running confusion matrix (missing labels are excluded)."""
from __future__ import annotations

import torch

from ..tasks import MISSING, Task


class TaskMeter:
    """Accumulates loss, confusion matrix and top-5 hits of one task over batches (on device)."""

    def __init__(self, task: Task, device: torch.device) -> None:
        self.task = task
        k = task.num_classes
        self.confusion = torch.zeros(k, k, dtype=torch.long, device=device)
        self.top5 = torch.zeros((), dtype=torch.long, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | None = None) -> None:
        mask = labels != MISSING
        y, logits = labels[mask], logits[mask]
        k = self.task.num_classes
        pred = logits.argmax(1)
        self.confusion += torch.bincount(y * k + pred, minlength=k * k).view(k, k)
        if k >= 10:
            self.top5 += (logits.topk(5, 1).indices == y[:, None]).any(1).sum()
        if loss is not None:
            self.loss_sum += loss.detach().double() * mask.sum()

    def compute(self) -> dict[str, float]:
        cm = self.confusion.double().cpu()
        n = cm.sum().item()
        out = {"count": int(n)}
        if n == 0:
            return out
        out["loss"] = self.loss_sum.item() / n
        names = self.task.metric_names()
        out["accuracy"] = cm.diag().sum().item() / n
        if "top5" in names:
            out["top5"] = self.top5.item() / n
        if "balanced_accuracy" in names:
            support = cm.sum(1)
            recall = cm.diag()[support > 0] / support[support > 0]
            out["balanced_accuracy"] = recall.mean().item()
        return out
