"""Report of a bench directory (`mtlvision bench`): the results table, Δm (± its spread including the
single-task seeds, and its 95% confidence interval) and per-task accuracy bar charts (mean ± std over
seeds), and links to every run directory of the suite."""
from __future__ import annotations

import csv
import datetime
import json
import os
from pathlib import Path
from typing import Any, Optional

from ..bench import _dirname
from ..errors import MTLVisionError
from . import plots
from .document import Figure, Link, Report, Section, Table, Text

STL = "single-task"


def read_results(bench_dir: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Task names and rows of results.csv (as written by bench.write_results); numbers as floats or None."""
    path = bench_dir / "results.csv"
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        body = list(reader)
    if not header or header[:3] != ["architecture", "method", "seeds"] or "delta_m_mean" not in header:
        raise MTLVisionError(f"{path}: not a results file of `mtlvision bench` (header {header})")
    if not body:
        raise MTLVisionError(f"{path}: no result rows (no run of the suite has finished)")
    tasks = [c[:-len("_mean")] for c in header[3:header.index("delta_m_mean")] if c.endswith("_mean")]
    rows = []
    for values in body:
        raw = dict(zip(header, values))

        def num(key: str) -> Optional[float]:
            return float(raw[key]) if raw.get(key) not in (None, "") else None

        rows.append({"architecture": raw["architecture"], "method": raw["method"], "seeds": raw["seeds"],
                     "tasks": {t: (num(f"{t}_mean"), num(f"{t}_std")) for t in tasks},
                     "delta_m": (num("delta_m_mean"), num("delta_m_std")),
                     "delta_m_ci": (num("delta_m_ci_low"), num("delta_m_ci_high")),
                     **{k: num(k) for k in ("images_per_s", "s_per_epoch", "peak_memory_mb", "parameters")}})
    return tasks, rows


def _label(row: dict[str, Any]) -> str:
    return STL if row["architecture"] == STL else f"{row['architecture']} / {row['method']}"


def _run_dirs(bench_dir: Path, row: dict[str, Any]) -> list[Path]:
    """The run directories (finished or not) behind a results row, in the layout `bench.plan` uses."""
    base = bench_dir / "stl" if row["architecture"] == STL else (
        bench_dir / _dirname(row["architecture"]) / _dirname(row["method"]))
    pattern = "*/seed*" if row["architecture"] == STL else "seed*"
    return sorted(p for p in base.glob(pattern) if (p / "config.yaml").is_file())


def _pm(value: tuple[Optional[float], Optional[float]], signed: bool = False) -> str:
    mean, std = value
    if mean is None:
        return "-"
    text = f"{mean:{'+' if signed else ''}.2f}"
    return text if std is None else f"{text} ± {std:.2f}"


def _ci(value: tuple[Optional[float], Optional[float]]) -> str:
    return "-" if value[0] is None or value[1] is None else f"[{value[0]:+.2f}, {value[1]:+.2f}]"


def _num(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def build_bench_report(bench_dir: Path, out: Path) -> Report:
    """The report of a finished or partial suite; `out` is where the pages go (links are relative to it)."""
    if not (bench_dir / "results.csv").is_file():
        raise MTLVisionError(f"{bench_dir}: not a bench directory (no results.csv)")
    tasks, rows = read_results(bench_dir)
    suite_file = bench_dir / "suite.json"
    name = json.loads(suite_file.read_text())["suite"]["name"] if suite_file.is_file() else bench_dir.name
    notes = [] if suite_file.is_file() else ["suite.json is missing: the suite's settings are not shown."]

    def link(path: Path) -> Link:
        """Text: the part of the path the row does not already say (seed, and task for single-task runs)."""
        text = path.relative_to(bench_dir / "stl").as_posix() if path.parent.parent.name == "stl" else path.name
        return Link(text, Path(os.path.relpath(path, out)).as_posix() + "/")

    header = ["architecture", "method", *[f"{t} (%)" for t in tasks], "Δm (%)", "Δm 95% CI", "img/s", "s/epoch",
              "peak MB", "parameters", "seeds", "runs"]
    table_rows = [[r["architecture"], r["method"], *[_pm(r["tasks"][t]) for t in tasks], _pm(r["delta_m"], True),
                   _ci(r["delta_m_ci"]),
                   _num(r["images_per_s"]), _num(r["s_per_epoch"]), _num(r["peak_memory_mb"], 0),
                   _num(r["parameters"], 0), r["seeds"], [link(p) for p in _run_dirs(bench_dir, r)] or "-"]
                  for r in rows]
    sections = [Section("Results", [
        Text("Test accuracy at the best validation epoch, mean ± sample std (n − 1) over seeds; Δm between the "
             "seed means of a row and of the single-task runs (positive: the multi-task model is better), ± its "
             "spread for one run on each side with both sides' seed variance propagated, and a Student-t 95% "
             "confidence interval of the mean where every side has ≥ 3 seeds; single-task parameters: the "
             "networks of all tasks together."),
        Table(header, table_rows, f"From {bench_dir / 'results.csv'}.")])]
    dm = [r for r in rows if r["architecture"] != STL and r["delta_m"][0] is not None]
    if dm:
        sections.append(Section("Δm", [Figure("delta_m", plots.delta_m_bars(
            [_label(r) for r in dm], [r["delta_m"][0] for r in dm], [r["delta_m"][1] or 0.0 for r in dm]),
            "Δm (%) by architecture / method, error bars: ± spread over seeds (multi- and single-task)")]))
    else:
        sections.append(Section("Δm", [Text("No row has Δm (the suite has no finished single-task baselines).",
                                            note=True)]))
    blocks: list[Any] = []
    for t in tasks:
        have = [r for r in rows if r["tasks"][t][0] is not None]
        if have:
            ref = next((i for i, r in enumerate(have) if r["architecture"] == STL), None)
            blocks.append(Figure(f"accuracy_{t}", plots.accuracy_bars(
                t, [_label(r) for r in have], [r["tasks"][t][0] for r in have],
                [r["tasks"][t][1] or 0.0 for r in have], ref),
                f"{t}: test accuracy by architecture / method (grey: single-task baseline), ± std over seeds"))
    sections.append(Section("Per-task accuracy", blocks))
    if suite_file.is_file():
        suite = json.loads(suite_file.read_text())
        settings = [["base config", str(suite.get("config", "-"))],
                    ["shared overrides", ", ".join(suite["suite"].get("set", []) + suite.get("set", [])) or "-"],
                    ["seeds", ", ".join(map(str, suite["suite"].get("seeds", [])))],
                    ["runs planned", str(len(suite.get("runs", [])))]]
        sections.append(Section("Suite", [Table(["", "value"], settings)]))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return Report(f"Bench report: {name}", f"{bench_dir.resolve()} · {len(rows)} rows · generated {when}",
                  sections, notes)
