"""Benchmark suites: a grid of architectures x balancing methods x seeds, always with single-task baselines.

A suite YAML names a base run config, the budget overrides every run shares, and the grid:

    name: multimnist
    config: ../multimnist.yaml          # relative to the suite file
    set: [train.epochs=2]               # applied to every run, single-task ones included
    seeds: [0, 1, 2]
    methods: [equal, mgda, {method: cagrad, c: 0.4}]
    architectures: [hps, task-features] # default: the base config's
    single_task: true
    single_task_set: [train.epochs=64]  # optional: the single-task runs' own budget, after `set`

Every run is its own `mtlvision train` process (so a crash or a leak stays in one run, and the peak
memory it reports is its own) in OUT/<architecture>/<method>/seed<k> or OUT/stl/<task>/seed<k>
(OUT/stl-<single_task_set>/<task>/seed<k> with a budget of their own, so baselines of two budgets share the
multi-task runs);
finished runs are skipped and interrupted ones resumed, so re-running the command completes a suite.
Δm of a row is taken between the seed means of its runs and of the single-task runs; its spread
includes both sides' seed variance (propagated, see `evaluation/delta_m.py`), with a Student-t 95%
confidence interval of the mean where every side has >= 3 seeds.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np
import yaml

from .config import load_config
from .errors import ConfigError, MTLVisionError
from .evaluation.delta_m import delta_m_stats
from .schema import parse
from .storage import write_json, write_text
from .rundir import config_differences

Part = Union[str, dict[str, Any]]


@dataclasses.dataclass
class Suite:
    name: str
    config: str
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    set: list[str] = dataclasses.field(default_factory=list)
    methods: list[Part] = dataclasses.field(default_factory=lambda: ["equal"])
    architectures: list[Part] = dataclasses.field(default_factory=list)
    single_task: bool = True
    # overrides for the single-task runs only, applied after `set` and before the command line's --set: a
    # task with 1/T of the images makes 1/T of the steps at the same epochs (Omniglot as 50 tasks)
    single_task_set: list[str] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: expected a non-empty list of distinct integers, got {self.seeds}")
        if not self.methods:
            raise ConfigError("methods: expected at least one balancing method")
        if self.single_task_set and not self.single_task:
            raise ConfigError("single_task_set: given, but single_task is false (no single-task runs to apply "
                              "it to)")

    @property
    def single_task_label(self) -> str:
        """The single-task runs' own overrides, comma-joined ("" when they share the suite's budget)."""
        return ",".join(self.single_task_set)


@dataclasses.dataclass
class Run:
    """One cell of the grid: where it lives and the overrides that make it."""

    kind: str  # "mtl" or "stl"
    arch: str  # architecture label ("" for single-task runs)
    method: str  # method label, or the task name for single-task runs
    seed: int
    out: Path
    overrides: list[str]

    @property
    def done(self) -> bool:
        return (self.out / "summary.json").is_file()


def _label(part: Part, key: str) -> tuple[str, dict[str, Any]]:
    """("cagrad(c=0.4)", {"method": "cagrad", "c": 0.4}) from "cagrad" or a mapping."""
    spec = {key: part} if isinstance(part, str) else dict(part)
    if key not in spec:
        raise ConfigError(f"expected a name or a mapping with '{key}', got {part!r}")
    extra = ",".join(f"{k}={v}" for k, v in spec.items() if k != key)
    return (f"{spec[key]}({extra})" if extra else str(spec[key])), spec


def _dirname(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", label).strip("_")


def _yaml_flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def load_suite(path: str | os.PathLike) -> tuple[Suite, Path]:
    """Parse and validate a suite file; returns it and its resolved base config path."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"suite file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    suite = parse(Suite, raw, "")
    base = (p.parent / suite.config).resolve()
    if not base.is_file():
        raise ConfigError(f"{p}: config: {base} does not exist")
    return suite, base


def plan(suite: Suite, base: Path, out: Path, extra: Optional[list[str]] = None) -> list[Run]:
    """Every run of the suite, single-task baselines first; validates each run's config up front."""
    # the suite trains its own baselines: runs never nest single-task trainings of their own
    common = [*suite.set, *(extra or []), "baselines={}"]
    cfg = load_config(base, common)
    tasks = _task_names(cfg)
    archs = [_label(a, "name") for a in suite.architectures] or [_label(cfg.model.architecture.to_config(full=False), "name")]
    methods = [_label(m, "method") for m in suite.methods]
    runs: list[Run] = []
    if suite.single_task:
        own = suite.single_task_label
        stl_dir = out / ("stl-" + _dirname(own) if own else "stl")
        stl_common = [*suite.set, *suite.single_task_set, *(extra or []), "baselines={}"]
        for task in tasks:
            for seed in suite.seeds:
                sets = [*stl_common, f"seed={seed}", f"name={cfg.name}-stl-{task}", "balancing={method: equal}"]
                sets += [f"tasks.{t}.enabled={str(t == task).lower()}" for t in tasks]
                runs.append(Run("stl", "", task, seed, stl_dir / _dirname(task) / f"seed{seed}", sets))
    for arch_label, arch in archs:
        for method_label, method in methods:
            for seed in suite.seeds:
                sets = [*common, f"seed={seed}", f"model.architecture={_yaml_flow(arch)}",
                        f"balancing={_yaml_flow(method)}"]
                where = out / _dirname(arch_label) / _dirname(method_label) / f"seed{seed}"
                runs.append(Run("mtl", arch_label, method_label, seed, where, sets))
    seen: set[Path] = set()
    for run in runs:  # fail on a bad cell, or a folder holding another config, before hours of training
        cell = f"suite run {run.arch or 'stl'}/{run.method}/seed{run.seed}"
        if run.out in seen:
            raise ConfigError(f"{cell}: listed twice (the suite names the same architecture, method or seed "
                              "more than once)")
        seen.add(run.out)
        try:
            wanted = load_config(base, run.overrides).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"{cell}: {exc}") from None
        if (run.out / "config.yaml").is_file():
            diff = config_differences(load_config(run.out / "config.yaml").to_dict(), wanted)
            if diff:
                raise MTLVisionError(f"{cell}: {run.out} holds a run with a different config "
                                     f"({', '.join(diff[:8])}); remove it or give another --out")
    return runs


def _task_names(cfg: Any) -> list[str]:
    """Enabled task names of a config (builds its data once; the runs then read the decoded cache)."""
    from .data.build import build_data

    return [t.name for t in build_data(cfg).tasks]


def run_one(run: Run, base: Path) -> None:
    """Train one cell in its own process (resuming an interrupted one)."""
    # a cell whose first start died before its first checkpoint is this suite's own folder: replace it
    cmd = [sys.executable, "-m", "mtlvision", "train", str(base), "--quiet", "--out", str(run.out), "--overwrite"]
    if (run.out / "checkpoint.pt").is_file():
        cmd = [sys.executable, "-m", "mtlvision", "train", "--quiet", "--resume", str(run.out)]
    for s in run.overrides:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise MTLVisionError(f"run {run.out} failed (exit {proc.returncode}):\n{tail}")


def _mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (n - 1); no spread from one seed."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else None


def aggregate(runs: list[Run], single_task_label: str = "") -> list[dict[str, Any]]:
    """One row per (architecture, method) and one for the single-task baselines (labelled with their own
    overrides, if any), over finished seeds."""
    summaries = {id(r): json.loads((r.out / "summary.json").read_text()) for r in runs if r.done}
    stl: dict[str, list[float]] = {}
    stl_runs = [r for r in runs if r.kind == "stl" and id(r) in summaries]
    for r in stl_runs:
        stl.setdefault(r.method, []).append(summaries[id(r)]["tasks"][r.method]["test"]["accuracy"])
    rows = []
    if stl_runs:
        label = f"single-task ({single_task_label})" if single_task_label else "single-task"
        row = _row(label, "equal", [summaries[id(r)] for r in stl_runs])
        row["tasks"] = {t: _mean_std([100 * a for a in v]) for t, v in stl.items()}
        # the T single-task networks together (one finished run per task)
        row["parameters"] = sum({r.method: summaries[id(r)].get("parameters") or 0 for r in stl_runs}.values())
        row["delta_m"], row["seeds"] = (0.0, None), min(len(v) for v in stl.values())  # 0 by definition
        rows.append(row)
    cells: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        if r.kind == "mtl":
            cells.setdefault((r.arch, r.method), []).append(r)
    for (arch, method), members in cells.items():
        done = [summaries[id(r)] for r in members if id(r) in summaries]
        if not done:
            continue
        row = _row(arch, method, done)
        names = list(done[0]["tasks"])
        row["tasks"] = {t: _mean_std([100 * s["tasks"][t]["test"]["accuracy"] for s in done]) for t in names}
        if set(names) <= set(stl):
            st = delta_m_stats([{t: s["tasks"][t]["test"]["accuracy"] for t in names} for s in done],
                               {t: stl[t] for t in names})
            row.update(delta_m=(st.mean, st.sd), delta_m_ci=st.ci, delta_m_sd_mtl=st.sd_mtl, delta_m_df=st.df)
        rows.append(row)
    return rows


def _row(arch: str, method: str, done: list[dict[str, Any]]) -> dict[str, Any]:
    rate = [s["train_images_per_s"] for s in done if s.get("train_images_per_s")]
    mem = [s["peak_memory_mb"] for s in done if s.get("peak_memory_mb")]
    return {"architecture": arch, "method": method, "seeds": len(done), "delta_m": None, "delta_m_ci": None,
            "delta_m_sd_mtl": None, "delta_m_df": None,
            "images_per_s": float(np.mean(rate)) if rate else None,
            "s_per_epoch": float(np.mean([s["wall_time_s"] / s["epochs"] for s in done])),
            "peak_memory_mb": max(mem) if mem else None, "parameters": done[0].get("parameters")}


def _pm(value: Optional[tuple[float, Optional[float]]], signed: bool = False) -> str:
    if value is None:
        return "-"
    mean = f"{value[0]:+.2f}" if signed else f"{value[0]:.2f}"
    return mean if value[1] is None else f"{mean} ± {value[1]:.2f}"


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ci(value: Optional[tuple[float, float]]) -> str:
    return "-" if value is None else f"[{value[0]:+.2f}, {value[1]:+.2f}]"


def write_results(rows: list[dict[str, Any]], out: Path, header: str) -> None:
    """results.md (mean ± std over seeds) and results.csv (one column per number)."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))
    cols = ["architecture", "method", *[f"{t} (%)" for t in tasks], "Δm (%)", "Δm 95% CI", "img/s", "s/epoch",
            "peak MB", "parameters", "seeds"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["architecture"], r["method"], *[_pm(r["tasks"].get(t)) for t in tasks],
                 _pm(r["delta_m"], signed=True), _ci(r.get("delta_m_ci")), _fmt(r["images_per_s"]),
                 _fmt(r["s_per_epoch"]), _fmt(r["peak_memory_mb"], 0),
                 f"{r['parameters']:,}" if r["parameters"] else "-", str(r["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    write_text(out / "results.md", "\n".join(lines) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["architecture", "method", "seeds", *[f"{t}_{s}" for t in tasks for s in ("mean", "std")],
                "delta_m_mean", "delta_m_std", "delta_m_ci_low", "delta_m_ci_high", "delta_m_std_mtl", "delta_m_df",
                "images_per_s", "s_per_epoch", "peak_memory_mb", "parameters"])
    for r in rows:
        acc = ["" if v is None else v for t in tasks for v in (r["tasks"].get(t) or ("", ""))]
        dm = ["" if v is None else v for v in [*(r["delta_m"] or ("", "")), *(r.get("delta_m_ci") or ("", "")),
                                               r.get("delta_m_sd_mtl"), r.get("delta_m_df")]]
        w.writerow([r["architecture"], r["method"], r["seeds"], *acc, *dm, r["images_per_s"], r["s_per_epoch"],
                    r["peak_memory_mb"], r["parameters"]])
    write_text(out / "results.csv", buf.getvalue())


def run_suite(path: str | os.PathLike, out: Optional[str | os.PathLike] = None, extra: Optional[list[str]] = None,
              on_run: Optional[Callable[[int, int, Run, str], None]] = None) -> Path:
    """Run (or complete) a suite; writes results.md and results.csv and returns the suite directory."""
    suite, base = load_suite(path)
    out_dir = Path(out) if out is not None else Path("runs") / "bench" / suite.name
    runs = plan(suite, base, out_dir, extra)
    write_json(out_dir / "suite.json", {"suite": dataclasses.asdict(suite), "config": str(base),
                                        "set": extra or [], "runs": [str(r.out) for r in runs]})
    for i, run in enumerate(runs):
        if on_run:
            on_run(i, len(runs), run, "skip" if run.done else "run")
        if not run.done:
            run_one(run, base)
    rows = aggregate(runs, suite.single_task_label)
    cmd = " ".join(["mtlvision bench", str(path), *[f"--set {s}" for s in extra or []]])
    header = (f"# {suite.name}: test accuracy, mean ± sample std (n − 1) over seeds {suite.seeds}\n\n"
              f"Reproduce: `{cmd}`. Δm between the seed means of a row and of the single-task runs, ± its "
              "spread for one run on each side, both sides' seed variance propagated; 95% CI: Student t of the "
              "mean (Welch–Satterthwaite), where every side has ≥ 3 seeds (mtlvision/evaluation/delta_m.py). "
              "Single-task parameters: the networks of all tasks together.")
    write_results(rows, out_dir, header)
    return out_dir
