"""A probe (balancing/context.py) for tests that drive an mtlvision model by hand instead of through the trainer.

Extra batches are bootstrap resamples of the step's batch keyed by (kind, index); the forward runs through
`torch.func.functional_call` with shifted parameters and copied buffers, as `training/probes.py` does.
"""
from __future__ import annotations

from typing import Optional

import torch

from mtlvision.balancing import Probe, StepContext


def model_probe(model, x: torch.Tensor, y: dict[str, torch.Tensor], tasks, split: bool = False):
    def probe(batch: str = "train", index: int = 1, shift: Optional[dict] = None) -> Probe:
        if batch == "train" and index == 0:
            xb, yb = x, y
        else:
            g = torch.Generator().manual_seed(1000 * (batch == "val") + index)
            rows = torch.randint(0, len(x), (len(x),), generator=g)
            xb, yb = x[rows], {k: v[rows] for k, v in y.items()}
        moved = {id(p): d for p, d in (shift or {}).items()}
        state = {n: p + moved[id(p)] if id(p) in moved else p for n, p in model.named_parameters()}
        state.update({n: b.clone() for n, b in model.named_buffers()})
        out = torch.func.functional_call(model, state, (xb,), {"split": split})
        losses = {t.name: t.loss(out.logits[t.name], yb[t.name]) for t in tasks}
        return Probe(losses, StepContext(out.shared, model.shared_parameters(), model.task_parameters(), 0, 0,
                                         trunk=out.trunk))
    return probe
