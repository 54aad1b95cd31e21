"""Δm (Maninis et al., 2019): mean relative gain of the multi-task model over single-task models.

    Δm = (1/T) Σ_t (-1)^{l_t} (M_mtl,t - M_stl,t) / M_stl,t × 100

with l_t = 0 because every metric here (accuracy) is higher-is-better: Δm > 0 means the
multi-task model beats the single-task baselines on average.

Spread over seeds (`delta_m_stats`, `delta_m_from_summary`). Both sides are noisy: the multi-task
runs (n_m seeds) and the single-task baselines (n_t seeds for task t, each task its own network). Δm
of the seed means is

    Δm = (100/T) Σ_t (m_t - s_t) / s_t          m_t, s_t: mean accuracy of task t over seeds

and its variance is propagated to first order (delta method), the two sides being independent runs:

    Var(Δm) = V_mtl + Σ_t c_t² σ_t² / n_t,      c_t = ∂Δm/∂s_t = -(100/T) m_t / s_t²
    V_mtl   = sd_mtl² / n_m                      sd_mtl: sample std (n - 1) of the per-seed Δm
                                                 (each multi-task seed against the averaged baselines)

sd_mtl keeps the correlation between one multi-task run's tasks; the single-task networks are
independent, so their terms add. Reported: the mean, `sd` = the same propagation for ONE run on each
side (sqrt(sd_mtl² + Σ_t c_t² σ_t²): the spread a rerun of one seed would show, comparable to the
per-task ± std), the standard error `se` = sqrt(Var(Δm)), and a Student-t confidence interval of the
mean, mean ± t(ν) × se, with ν from Welch–Satterthwaite, when every side has >= 3 seeds.

Why not pair multi-task seed i with single-task seed i: the runs share a seed number but no
randomness that matters (the networks differ), so the spread of paired differences would depend on an
arbitrary matching; pairing also needs equal seed lists, while propagation uses every run and can be
recomputed from published means and stds alone (as the README's tables are).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence

from ..errors import MTLVisionError

LEVEL = 0.95
MIN_SEEDS_CI = 3


def delta_m(mtl: Mapping[str, float], stl: Mapping[str, float]) -> float:
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


@dataclasses.dataclass
class DeltaMStats:
    """Δm of the seed means with its spread (see the module docstring); None where too few seeds."""

    mean: float
    sd: Optional[float]  # one multi-task run against one set of single-task runs
    se: Optional[float]  # of the mean
    ci: Optional[tuple[float, float]]  # Student t, LEVEL, when every side has >= MIN_SEEDS_CI seeds
    df: Optional[float]  # Welch–Satterthwaite degrees of freedom of the interval
    sd_mtl: Optional[float]  # std of the per-seed Δm over the multi-task seeds alone (the old spread)
    n_mtl: int
    n_stl: dict[str, int]


def _sample_sd(values: Sequence[float]) -> Optional[float]:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def delta_m_stats(mtl_runs: Sequence[Mapping[str, float]], stl_runs: Mapping[str, Sequence[float]]
                  ) -> DeltaMStats:
    """Δm and its spread from every multi-task seed's per-task metrics and every single-task seed's."""
    if not mtl_runs:
        raise MTLVisionError("Δm needs at least one multi-task run")
    empty = sorted(t for t, v in stl_runs.items() if not v)
    if empty:
        raise MTLVisionError(f"no single-task run for task(s) {empty}")
    tasks = list(mtl_runs[0])
    stl_mean = {t: sum(v) / len(v) for t, v in stl_runs.items()}
    per_seed = [delta_m({t: run[t] for t in tasks}, stl_mean) for run in mtl_runs]
    mtl_mean = {t: sum(run[t] for run in mtl_runs) / len(mtl_runs) for t in tasks}
    return delta_m_from_summary(mtl_mean, _sample_sd(per_seed), len(mtl_runs), stl_mean,
                                {t: _sample_sd(stl_runs[t]) for t in tasks}, {t: len(stl_runs[t]) for t in tasks})


def delta_m_from_summary(mtl_mean: Mapping[str, float], sd_mtl: Optional[float], n_mtl: int,
                         stl_mean: Mapping[str, float], stl_sd: Mapping[str, Optional[float]],
                         n_stl: Mapping[str, int]) -> DeltaMStats:
    """The same statistics from means and sample stds alone: per-task means of both sides, the std of
    the per-seed Δm of the multi-task runs, the single-task stds and seed counts (a results table)."""
    tasks = list(mtl_mean)
    mean = delta_m(mtl_mean, stl_mean)
    T = len(tasks)
    coef = {t: 100.0 * mtl_mean[t] / (T * stl_mean[t] ** 2) for t in tasks}
    n_stl = {t: int(n_stl[t]) for t in tasks}
    known = sd_mtl is not None and n_mtl >= 2 and all(stl_sd[t] is not None and n_stl[t] >= 2 for t in tasks)
    if not known:
        return DeltaMStats(mean, None, None, None, None, sd_mtl, n_mtl, n_stl)
    one_run = [sd_mtl ** 2] + [(coef[t] * stl_sd[t]) ** 2 for t in tasks]
    parts = [(sd_mtl ** 2 / n_mtl, n_mtl - 1)] + [((coef[t] * stl_sd[t]) ** 2 / n_stl[t], n_stl[t] - 1)
                                                   for t in tasks]
    var = sum(v for v, _ in parts)
    se = math.sqrt(var)
    ci = df = None
    if n_mtl >= MIN_SEEDS_CI and all(n >= MIN_SEEDS_CI for n in n_stl.values()):
        denom = sum(v * v / d for v, d in parts)
        df = var * var / denom if denom > 0 else float(min(n_mtl, *n_stl.values()) - 1)
        half = t_quantile(0.5 + LEVEL / 2, df) * se
        ci = (mean - half, mean + half)
    return DeltaMStats(mean, math.sqrt(sum(one_run)), se, ci, df, sd_mtl, n_mtl, n_stl)


# -- Student's t quantile (no SciPy dependency) ---------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (> 0, not necessarily integer) degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (0 < p < 1), by bisection on `t_cdf` (to ~1e-12)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)
