"""Δm (Maninis et al., 2019): mean relative gain of the multi-task model over single-task models.

    Δm = (1/T) Σ_t (-1)^{l_t} (M_mtl,t - M_stl,t) / M_stl,t × 100

with l_t = 0 because every metric here (accuracy) is higher-is-better: Δm > 0 means the
multi-task model beats the single-task baselines on average.
"""
from __future__ import annotations

from ..errors import MTLVisionError


def delta_m(mtl: dict[str, float], stl: dict[str, float]) -> float:
    """Δm in percent from per-task metrics (same metric, higher is better) of MTL and STL runs."""
    missing = sorted(set(mtl) - set(stl))
    if missing:
        raise MTLVisionError(f"no single-task baseline for task(s) {missing}")
    gains = []
    for task, m in mtl.items():
        if stl[task] <= 0:
            raise MTLVisionError(f"single-task baseline of {task!r} has metric {stl[task]}; Δm needs > 0")
        gains.append((m - stl[task]) / stl[task])
    return 100.0 * sum(gains) / len(gains)
