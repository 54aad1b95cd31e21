"""Terminal tables of per-task results (rich)."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def results_table(summary: dict[str, Any], title: str = "Results (test split, best validation epoch)") -> Table:
    metrics = sorted({k for t in summary["tasks"].values() for k in t["test"] if k not in ("count", "loss")},
                     key=["accuracy", "top5", "balanced_accuracy"].index)
    table = Table(title=title)
    table.add_column("task")
    table.add_column("classes", justify="right")
    for m in metrics:
        table.add_column(f"test {m}", justify="right")
    table.add_column("val accuracy", justify="right")
    stl = summary.get("single_task", {}).get("test_accuracy", {})
    if stl:
        table.add_column("single-task", justify="right")
    for name, t in summary["tasks"].items():
        row = [name, str(len(t["classes"]))]
        row += [f"{100 * t['test'][m]:.2f}%" if m in t["test"] else "-" for m in metrics]
        row.append(f"{100 * t['val'].get('accuracy', 0):.2f}%")
        if stl:
            row.append(f"{100 * stl[name]:.2f}%")
        table.add_row(*row)
    caption = f"best epoch {summary['best_epoch'] + 1}/{summary['epochs']}, {summary['wall_time_s']:.0f} s"
    if summary.get("train_images_per_s"):
        caption += f", {summary['train_images_per_s']:.0f} train img/s"
    if "delta_m" in summary:
        caption += f", Δm = {summary['delta_m']:+.2f}%"
    table.caption = caption
    return table


def print_results(summary: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(results_table(summary))
