"""Report of one run directory: summary, learning curves, task weights, gradient telemetry, and a fresh
evaluation of best.pt on the test split (confusion matrices, per-class accuracy, example predictions).

Whatever is missing (an interrupted run without summary.json, a run without best.pt, a dataset no
longer on this machine) is skipped with a note saying what and why, and the rest is still reported.
"""
from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from ..data.loader import TensorImages
from ..errors import MTLVisionError
from ..evaluation.evaluate import evaluate_meters
from ..inference import Run
from ..rundir import RunDir
from ..tasks import MISSING, Task
from . import plots
from .document import Code, Figure, Heading, Report, Section, Table, Text

Splits = list[tuple[TensorImages, list[str]]]  # (images, task names they label) per input stream

MAX_MATRIX_CLASSES = 30  # above this, a confusion matrix is unreadable: list the top confusions instead
TOP_CONFUSIONS = 15
GRID_IMAGES = 16
METRICS = {"accuracy": "accuracy", "top5": "top-5", "balanced_accuracy": "balanced accuracy"}


@dataclasses.dataclass
class TaskEvaluation:
    """One task's test-split confusion counts (rows: true class, columns: predicted) and metrics."""

    task: Task
    confusion: np.ndarray
    metrics: dict[str, float]

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(1)

    @property
    def normalised(self) -> np.ndarray:
        """Rows divided by their sums (each row with test images sums to 1; rows without stay 0)."""
        return self.confusion / np.maximum(self.support, 1)[:, None]

    @property
    def per_class_accuracy(self) -> np.ndarray:
        return np.diag(self.confusion) / np.maximum(self.support, 1)


def evaluate_test(run: Run, splits: Splits) -> dict[str, TaskEvaluation]:
    """Score a loaded `inference.Run` on `splits` (from `run.load_split`), keeping confusion matrices."""
    meters = evaluate_meters(run.model, splits, run.tasks, run.normalize, run.config.data.eval_batch_size)
    return {name: TaskEvaluation(m.task, m.confusion.cpu().numpy(), m.compute()) for name, m in meters.items()}


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.2f}%"


def _series(history: list[dict[str, Any]], split: str, task: str, key: str) -> list[float]:
    return [float(h.get(split, {}).get(task, {}).get(key, np.nan)) for h in history]


def _summary_section(summary: Optional[dict[str, Any]], evals: dict[str, TaskEvaluation],
                     history: list[dict[str, Any]], raw_cfg: dict[str, Any]) -> Section:
    blocks: list[Any] = []
    if summary is not None:
        tasks = {n: (t["test"], t["val"].get("accuracy"), len(t["classes"])) for n, t in summary["tasks"].items()}
        source = "summary.json (test split, weights of the best validation epoch)"
    else:
        tasks = {n: (e.metrics, None, e.task.num_classes) for n, e in evals.items()}
        source = "best.pt evaluated now on the test split (no summary.json: the run did not finish)"
    stl = (summary or {}).get("single_task", {}).get("test_accuracy", {})
    if tasks:
        metrics = [m for m in METRICS if any(m in test for test, _, _ in tasks.values())]  # no all-empty columns
        header = ["task", "classes", *[f"test {METRICS[m]}" for m in metrics], "test loss", "val accuracy"]
        header += ["single-task accuracy"] if stl else []
        rows = []
        for name, (test, val_acc, k) in tasks.items():
            row = [name, str(k), *[_pct(test.get(m)) for m in metrics],
                   f"{test['loss']:.4f}" if "loss" in test else "-", _pct(val_acc)]
            rows.append(row + ([_pct(stl.get(name))] if stl else []))
        blocks.append(Table(header, rows, f"Source: {source}."))
    info: list[list[Any]] = [["balancing method", str(raw_cfg.get("balancing", {}).get("method", "equal"))],
                             ["architecture", str(raw_cfg.get("model", {}).get("architecture", {}).get("name", "-"))],
                             ["backbone", str(raw_cfg.get("model", {}).get("backbone", {}).get("name", "-"))]]
    planned = raw_cfg.get("train", {}).get("epochs")
    info.append(["epochs finished", f"{len(history)} of {planned}" if planned else str(len(history))])
    if summary is not None:
        if "delta_m" in summary:
            info.append(["Δm vs single-task", f"{summary['delta_m']:+.2f}%"])
        info += [["best epoch", str(summary["best_epoch"] + 1)],
                 ["wall time", f"{summary['wall_time_s']:.1f} s"],
                 ["train images/s", f"{summary['train_images_per_s']:.1f}" if summary.get("train_images_per_s")
                  else "-"],
                 ["parameters", f"{summary['parameters']:,}" if summary.get("parameters") else "-"]]
        if summary.get("peak_memory_mb"):
            info.append(["peak memory", f"{summary['peak_memory_mb']:.0f} MB"])
        if summary.get("device"):
            info.append(["device", summary["device"]])
    elif history:
        info += [["wall time (so far)", f"{history[-1]['wall_time_s']:.1f} s"],
                 ["train images/s", f"{np.mean([h['images_per_s'] for h in history]):.1f}"]]
    blocks.append(Table(["", "value"], info))
    return Section("Summary", blocks)


def _curves_section(history: list[dict[str, Any]], best_epoch: Optional[int]) -> Section:
    epochs = [h["epoch"] + 1 for h in history]
    blocks: list[Any] = [Text("Train: running mean over each epoch's batches (with augmentation); "
                              "validation: held-out split at the end of each epoch. The dashed line marks the "
                              "best validation epoch (model selection).")]
    for task in history[-1]["train"]:
        blocks.append(Figure(f"curves_{task}", plots.learning_curves(
            task, epochs, _series(history, "train", task, "loss"), _series(history, "val", task, "loss"),
            _series(history, "train", task, "accuracy"), _series(history, "val", task, "accuracy"), best_epoch),
            f"{task}: loss and accuracy per epoch"))
    return Section("Learning curves", blocks)


def _tb_scalars(tb_dir: Path, prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """TensorBoard scalars whose tag starts with `prefix`: {rest of tag: (steps, values)}; {} without tb/."""
    if not tb_dir.is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get("scalars", []):
        if tag.startswith(prefix):
            by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run may log a step twice: keep last
            steps = np.array(sorted(by_step), dtype=float)
            out[tag[len(prefix):]] = (steps, np.array([by_step[s] for s in sorted(by_step)]))
    return out


def _weights_section(run_dir: Path, history: list[dict[str, Any]]) -> Section:
    means = {}
    for task in history[-1].get("balancing", {}).get("weight", {}):
        pts = [(h["epoch"] + 0.5, h["balancing"]["weight"][task]) for h in history
               if task in h.get("balancing", {}).get("weight", {})]
        means[task] = ([p[0] for p in pts], [p[1] for p in pts])
    steps_per_epoch = history[0]["step"] / (history[0]["epoch"] + 1)
    steps = {t: (s / steps_per_epoch, v) for t, (s, v) in _tb_scalars(RunDir(run_dir).tb_path, "task_weight/").items()}
    if not means and not steps:
        return Section("Task weights", [Text("No task weights were logged in metrics.jsonl or tb/.", note=True)])
    if steps:
        text = ("Lines: the weights at each logged step (TensorBoard events in tb/, every train.log_every steps); "
                "dots: their epoch means (metrics.jsonl). Epoch e spans [e − 1, e] on the x axis.")
    else:
        text = ("Epoch means of the sampled weights only (metrics.jsonl): no TensorBoard events with "
                "task_weight/ tags were found in tb/, so per-step values are not shown.")
    return Section("Task weights", [Text(text), Figure("task_weights", plots.task_weights(steps, means),
                                                       "task weights over training")])


def _gradients_section(history: list[dict[str, Any]], method: str) -> Section:
    logged = [h for h in history if "norm" in h.get("balancing", {})]
    if not logged:
        return Section("Gradients", [Text(f"Balancing method {method!r} logs no gradient statistics (only "
                                          "gradient methods compute per-task gradients); section skipped.")])
    epochs = [h["epoch"] + 1 for h in logged]
    blocks: list[Any] = [Text("Epoch means of the values read off the Gramian of the per-task gradients "
                              "at each logged step (feature or parameter space, as the method's `space`).")]
    pairs = list(logged[-1]["balancing"].get("cosine", {}))
    if pairs:
        cos = np.array([[h["balancing"].get("cosine", {}).get(p, np.nan) for h in logged] for p in pairs])
        blocks.append(Figure("gradient_cosines", plots.gradient_cosines(pairs, epochs, cos),
                             "pairwise cosine similarity of task gradients (rows: task pairs, columns: epochs; "
                             "red: aligned, blue: conflicting)"))
    tasks = list(logged[-1]["balancing"]["norm"])
    norms = {t: [h["balancing"]["norm"].get(t, np.nan) for h in logged] for t in tasks}
    blocks.append(Figure("gradient_norms", plots.gradient_norms(epochs, norms), "per-task gradient norm"))
    return Section("Gradients", blocks)


def top_confusions(ev: TaskEvaluation, n: int = TOP_CONFUSIONS) -> Table:
    """The `n` most frequent (true, predicted) mistakes, for tasks with too many classes for a matrix."""
    cm = ev.confusion.copy()
    np.fill_diagonal(cm, 0)
    order = np.argsort(cm, axis=None)[::-1][:n]
    rows = []
    for flat in order:
        i, j = divmod(int(flat), cm.shape[1])
        if cm[i, j] == 0:
            break
        rows.append([ev.task.classes[i], ev.task.classes[j], str(int(cm[i, j])),
                     f"{100 * cm[i, j] / ev.support[i]:.1f}%"])
    return Table(["true class", "predicted as", "images", "% of true class"], rows,
                 f"{ev.task.name}: {ev.task.num_classes} classes, so the {n} most frequent confusions are listed "
                 "instead of the full matrix.")


def _evaluation_section(evals: dict[str, TaskEvaluation], best_epoch: int) -> Section:
    blocks: list[Any] = [Text(f"best.pt (epoch {best_epoch}) evaluated now on the test split. Confusion matrices "
                              "are row-normalised: each row (a true class) sums to 1.")]
    for name, ev in evals.items():
        blocks += [Heading(name), Text(f"test accuracy {_pct(ev.metrics.get('accuracy'))} on "
                                       f"{int(ev.confusion.sum())} labelled images, {ev.task.num_classes} classes.")]
        if ev.confusion.sum() == 0:
            blocks.append(Text(f"{name}: no labelled test images; matrix and bars skipped.", note=True))
            continue
        if ev.task.num_classes > MAX_MATRIX_CLASSES:
            blocks.append(top_confusions(ev))
        else:
            blocks.append(Figure(f"confusion_{name}", plots.confusion_matrix(name, ev.task.classes, ev.normalised),
                                 f"{name}: confusion matrix (rows: true class, columns: predicted)"))
        blocks.append(Figure(f"per_class_{name}", plots.per_class_accuracy(name, ev.task.classes,
                                                                           ev.per_class_accuracy, ev.support),
                             f"{name}: accuracy per class (gold: below the mean over classes)"))
    return Section("Test-set evaluation", blocks)


def _images_section(run: Run, splits: Splits, n: int) -> Section:
    """Evenly spaced test images (shared among input streams) with predicted vs true label per task."""
    by_name = {t.name: t for t in run.tasks}
    images, captions = [], []
    for s, (data, names) in enumerate(splits):
        k = min(len(data), n // len(splits) + (s < n % len(splits)))
        if k == 0:
            continue
        idx = np.unique(np.linspace(0, len(data) - 1, k).round().astype(int))
        arrays = [data.images[i].cpu().numpy() for i in idx]
        preds = run.predict(arrays)
        for i, arr, pred in zip(idx, arrays, preds):
            lines = []
            for name in names:
                guess, truth = pred[name][0][0], int(data.labels[name][i])
                if truth == MISSING:
                    lines.append((f"{name}: {guess} (no label)", None))
                elif by_name[name].classes[truth] == guess:
                    lines.append((f"{name}: {guess}", True))
                else:
                    lines.append((f"{name}: {guess} (true: {by_name[name].classes[truth]})", False))
            images.append(arr)
            captions.append(lines)
    if not images:
        return Section("Test images", [Text("The test split is empty; no images to show.", note=True)])
    return Section("Test images", [
        Text("Evenly spaced test images with the prediction for each task: green when right, red when wrong "
             "(with the true class in brackets), grey when the image has no label for that task."),
        Figure("test_images", plots.image_grid(images, captions), f"{len(images)} test images")])


def build_run_report(run_dir: Path, device: str = "cpu", n_images: int = GRID_IMAGES) -> Report:
    """Everything a run directory allows; what it cannot (and why) goes into the report's notes."""
    rundir = RunDir(run_dir)
    if not rundir.is_run():
        raise MTLVisionError(f"{run_dir}: not a run directory (no config.yaml)")
    raw_cfg = yaml.safe_load(rundir.config_text()) or {}
    history, bad_lines = rundir.read_metrics()
    summary = rundir.read_summary()
    has_best = rundir.has_best()
    if not history and not has_best:
        raise MTLVisionError(f"{run_dir}: nothing to report: no metrics.jsonl and no best.pt (no epoch finished)")
    notes = []
    if bad_lines:
        notes.append(f"metrics.jsonl: {bad_lines} unreadable line(s) skipped.")
    if summary is None:
        notes.append("summary.json is missing (the run was interrupted or is still training): the summary shows "
                     "what metrics.jsonl and best.pt give.")
    evals: dict[str, TaskEvaluation] = {}
    run: Optional[Run] = None
    splits: Splits = []
    best_epoch: Optional[int] = None
    if not has_best:
        notes.append("best.pt is missing: the test-set evaluation (confusion matrices, per-class accuracy) and the "
                     "test images were skipped.")
    else:
        try:
            run = Run(run_dir, device=device)
            splits = run.load_split("test")
            evals = evaluate_test(run, splits)
            best_epoch = run.best_epoch + 1
        except MTLVisionError as exc:
            run = None
            notes.append(f"test-set evaluation and test images skipped: {exc}")
    if summary is not None:
        best_epoch = summary["best_epoch"] + 1
    method = str(raw_cfg.get("balancing", {}).get("method", "equal"))
    sections = [_summary_section(summary, evals, history, raw_cfg)]
    if history:
        sections += [_curves_section(history, best_epoch), _weights_section(run_dir, history),
                     _gradients_section(history, method)]
    else:
        notes.append("metrics.jsonl is missing or empty: learning curves, task weights and gradients were skipped.")
    if run is not None:
        sections += [_evaluation_section(evals, run.best_epoch + 1), _images_section(run, splits, n_images)]
    sections.append(Section("Configuration", [Code(rundir.config_text())]))
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"Run report: {raw_cfg.get('name', run_dir.name)}"
    return Report(title, f"{run_dir.resolve()} · method {method} · generated {when}", sections, notes)
