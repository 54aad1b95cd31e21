"""Results in the terminal (rich tables) and as report pages (`mtlvision report`): a self-contained
report.html and a report.md with its PNGs, for a run directory or a bench directory."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..errors import MTLVisionError
from ..rundir import RunDir
from ..storage import atomic_write, write_text
from .tables import print_results, results_table


def write_report(path: str | os.PathLike, out: Optional[str | os.PathLike] = None,
                 device: str = "cpu") -> dict[str, Path]:
    """Report a run directory (config.yaml) or a bench directory (results.csv) into `out`
    (default PATH/report); returns {"html": ..., "markdown": ...}. Plotting modules load only here."""
    src = Path(path)
    if not src.is_dir():
        raise MTLVisionError(f"{src}: no such directory")
    dest = Path(out) if out is not None else src / "report"
    if (src / "results.csv").is_file():
        from .bench_report import build_bench_report

        return _write_pages(build_bench_report(src, dest), dest)
    if RunDir(src).is_run():
        from .run_report import build_run_report

        return _write_pages(build_run_report(src, device), dest)
    raise MTLVisionError(f"{src}: neither a run directory (no config.yaml) nor a bench directory (no results.csv)")


def _write_pages(report, out: Path) -> dict[str, Path]:
    """out/report.html (self-contained), out/report.md and its PNGs, each written atomically."""
    from .document import figure_files, render_markdown
    from .html import render_html

    files = figure_files(report)
    for fig in report.figures():
        atomic_write(out / files[id(fig)], lambda f, png=fig.png: f.write(png))
    write_text(out / "report.md", render_markdown(report, files))
    write_text(out / "report.html", render_html(report))
    return {"html": out / "report.html", "markdown": out / "report.md"}


__all__ = ["print_results", "results_table", "write_report"]
