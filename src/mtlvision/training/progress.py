"""Progress display: a rich live bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
from typing import Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def _fmt(stats: dict[str, dict[str, float]]) -> str:
    return "  ".join(f"{t} {s['loss']:.3f}/{100 * s['accuracy']:.1f}%" for t, s in stats.items() if "loss" in s)


class ProgressReporter:
    """Shows epoch progress with per-task loss/accuracy and images/s."""

    def __init__(self, total_epochs: int, steps_per_epoch: int, enabled: bool = True,
                 console: Optional[Console] = None) -> None:
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and sys.stderr.isatty()
        self.total_epochs, self.steps = total_epochs, steps_per_epoch
        self._progress: Optional[Progress] = None
        self._task = None

    def start_epoch(self, epoch: int) -> None:
        if not self.live:
            return
        self._progress = Progress(TextColumn(f"epoch {epoch + 1}/{self.total_epochs}"), BarColumn(),
                                  MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.description}"),
                                  console=self.console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task("", total=self.steps)

    def update(self, epoch: int, step: int, stats: dict[str, dict[str, float]], images_per_s: float) -> None:
        if not self.enabled:
            return
        text = f"{_fmt(stats)}  {images_per_s:.0f} img/s"
        if self.live and self._progress is not None:
            self._progress.update(self._task, completed=step, description=text)
        else:
            self.console.print(f"epoch {epoch + 1}/{self.total_epochs} step {step}/{self.steps}  {text}",
                               highlight=False, soft_wrap=True)

    def end_epoch(self, epoch: int, train: dict, val: dict, images_per_s: float, best: bool) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.enabled:
            mark = "  *best*" if best else ""
            self.console.print(f"epoch {epoch + 1}/{self.total_epochs}  train {_fmt(train)}  |  val {_fmt(val)}"
                               f"  {images_per_s:.0f} img/s{mark}", highlight=False, soft_wrap=True)

    def message(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False, soft_wrap=True)
