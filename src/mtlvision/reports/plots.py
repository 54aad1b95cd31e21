"""Report figures, one function per figure, each returning PNG bytes.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no GUI, no global
backend switch), so reports render on headless machines and inside other programs.
"""
from __future__ import annotations

import io
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 110
TRAIN, VAL = "#1f77b4", "#ff7f0e"
GOOD, BAD, NEUTRAL = "#1a7f37", "#cf222e", "#59636e"


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _short(label: str, n: int = 18) -> str:
    return label if len(label) <= n else label[:n - 1] + "…"


def learning_curves(task: str, epochs: Sequence[int], train_loss: Sequence[float], val_loss: Sequence[float],
                    train_acc: Sequence[float], val_acc: Sequence[float], best_epoch: Optional[int]) -> bytes:
    """Loss and accuracy per epoch (train: running mean over the epoch; val: end of epoch)."""
    fig = Figure(figsize=(9, 3.1))
    for ax, (name, tr, va) in zip(fig.subplots(1, 2), (("loss", train_loss, val_loss),
                                                       ("accuracy (%)", [100 * a for a in train_acc],
                                                        [100 * a for a in val_acc]))):
        ax.plot(epochs, tr, "o-", color=TRAIN, ms=3.5, label="train")
        ax.plot(epochs, va, "s-", color=VAL, ms=3.5, label="validation")
        if best_epoch is not None:
            ax.axvline(best_epoch, color=NEUTRAL, ls="--", lw=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.axes[0].legend(fontsize=8)
    fig.suptitle(task, fontsize=11)
    return _png(fig)


def task_weights(steps: dict[str, tuple[Sequence[float], Sequence[float]]],
                 means: dict[str, tuple[Sequence[float], Sequence[float]]]) -> bytes:
    """Task weights: lines at each logged step (may be empty), dots at epoch means; x in epochs."""
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    colours = _colours(list(means) or list(steps))
    for task, colour in colours.items():
        if task in steps:
            ax.plot(*steps[task], "-", color=colour, lw=1, alpha=0.75, label=task)
        if task in means:
            ax.plot(*means[task], "o", color=colour, ms=6, mec="black", mew=0.6,
                    label=None if task in steps else task)
    ax.set_xlabel("epoch")
    ax.set_ylabel("task weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=min(len(colours), 6), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _png(fig)


def gradient_cosines(pairs: Sequence[str], epochs: Sequence[int], cosines: np.ndarray) -> bytes:
    """Heatmap of pairwise gradient cosine similarities (rows: task pairs, columns: epochs)."""
    n_pairs, n_epochs = cosines.shape
    fig = Figure(figsize=(min(14.0, 3.2 + 0.55 * n_epochs), 1.2 + 0.38 * n_pairs))
    ax = fig.subplots()
    lim = float(np.clip(np.nanmax(np.abs(cosines)), 0.05, 1.0))
    im = ax.imshow(cosines, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(n_pairs), [p.replace("|", " · ") for p in pairs], fontsize=8)
    step = max(1, n_epochs // 20)
    ax.set_xticks(range(0, n_epochs, step), [str(e) for e in epochs[::step]], fontsize=8)
    ax.set_xlabel("epoch")
    if n_pairs * n_epochs <= 200:
        for (i, j), v in np.ndenumerate(cosines):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if abs(v) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, label="cosine", fraction=0.05, pad=0.02)
    return _png(fig)


def gradient_norms(epochs: Sequence[int], norms: dict[str, Sequence[float]]) -> bytes:
    """Per-task gradient norm (epoch mean of logged steps)."""
    fig = Figure(figsize=(9, 3.2))
    ax = fig.subplots()
    for task, colour in _colours(list(norms)).items():
        ax.plot(epochs, norms[task], "o-", color=colour, ms=3.5, label=task)
    ax.set_xlabel("epoch")
    ax.set_ylabel("gradient norm")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def confusion_matrix(task: str, classes: Sequence[str], normalised: np.ndarray) -> bytes:
    """Row-normalised confusion matrix (rows: true class, columns: predicted), values annotated when small."""
    k = len(classes)
    size = min(11.0, 2.2 + 0.42 * k)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.subplots()
    im = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    labels = [_short(c, 14) for c in classes]
    font = 8 if k <= 15 else 6
    ax.set_xticks(range(k), labels, rotation=45 if k > 4 else 0, ha="right" if k > 4 else "center", fontsize=font)
    ax.set_yticks(range(k), labels, fontsize=font)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(task, fontsize=10)
    if k <= 12:
        for (i, j), v in np.ndenumerate(normalised):
            if v >= 0.005:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of true class")
    return _png(fig)


def per_class_accuracy(task: str, classes: Sequence[str], accuracy: np.ndarray, support: np.ndarray) -> bytes:
    """Accuracy (recall) of each class on the test split; classes without test images are left out."""
    keep = support > 0
    names = [c for c, k in zip(classes, keep) if k]
    acc = 100 * accuracy[keep]
    k = len(names)
    fig = Figure(figsize=(min(16.0, max(4.5, 1.2 + 0.32 * k)), 3.3))
    ax = fig.subplots()
    colours = [GOOD if a >= 100 * accuracy[keep].mean() else "#bf8700" for a in acc]
    ax.bar(range(k), acc, color=colours)
    ax.axhline(100 * (accuracy[keep] * support[keep]).sum() / support[keep].sum(), color=NEUTRAL, ls="--", lw=1,
               label="overall accuracy")
    ax.set_xticks(range(k), [_short(n, 14) for n in names], rotation=90 if k > 6 else 0, fontsize=8 if k <= 30 else 6)
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(task, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.0), frameon=False)
    return _png(fig)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[Sequence[tuple[str, Optional[bool]]]],
               cols: int = 4) -> bytes:
    """Images with one caption line per task: green when the prediction is right, red when wrong,
    grey when the image has no label for that task."""
    rows = -(-len(images) // cols)
    lines = max(len(c) for c in captions)
    cell_w, img_h, line_h, pad = 2.4, 1.7, 0.19, 0.18  # inches
    cell_h = img_h + lines * line_h + pad
    fig = Figure(figsize=(cols * cell_w, rows * cell_h))
    width, height = cols * cell_w, rows * cell_h
    for n, (img, caption) in enumerate(zip(images, captions)):
        r, c = divmod(n, cols)
        x0, top = c * cell_w, height - r * cell_h
        ax = fig.add_axes(((x0 + (cell_w - img_h) / 2) / width, (top - img_h - 0.05) / height,
                           img_h / width, img_h / height))
        if img.shape[-1] == 1:  # grey images: fixed 0..255 scale, not stretched to each image's range
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        ax.set_axis_off()
        for i, (text, ok) in enumerate(caption):
            colour = NEUTRAL if ok is None else GOOD if ok else BAD
            fig.text((x0 + cell_w / 2) / width, (top - img_h - 0.1 - (i + 0.5) * line_h) / height, text,
                     ha="center", va="center", fontsize=7.5, color=colour, fontweight="bold" if ok is False else None)
    return _png(fig)


def delta_m_bars(labels: Sequence[str], means: Sequence[float], stds: Sequence[float]) -> bytes:
    """Δm (%) per architecture/method, mean ± std over seeds; positive = better than single-task."""
    n = len(labels)
    fig = Figure(figsize=(8, 1.0 + 0.38 * n))
    ax = fig.subplots()
    y = np.arange(n)[::-1]
    ax.barh(y, means, xerr=stds, color=[GOOD if m >= 0 else BAD for m in means], capsize=3, height=0.6)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    for yi, m, s in zip(y, means, stds):
        ax.text(m + (s if m >= 0 else -s), yi, f" {m:+.2f} ", va="center", ha="left" if m >= 0 else "right",
                fontsize=7.5)
    ax.margins(x=0.25)
    ax.set_xlabel("Δm (%) vs single-task, mean ± std over seeds")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def accuracy_bars(task: str, labels: Sequence[str], means: Sequence[float], stds: Sequence[float],
                  reference: Optional[int] = None) -> bytes:
    """Test accuracy (%) of one task per architecture/method, mean ± std; `reference` (the single-task
    row) is drawn in grey. The axis is zoomed to the data's range, as the differences are small."""
    n = len(labels)
    fig = Figure(figsize=(8, 1.0 + 0.38 * n))
    ax = fig.subplots()
    y = np.arange(n)[::-1]
    m, s = np.asarray(means, float), np.asarray(stds, float)
    ax.barh(y, m, xerr=s, capsize=3, height=0.6,
            color=["#8c959f" if i == reference else TRAIN for i in range(n)])
    ax.set_yticks(y, labels, fontsize=8)
    lo, hi = float((m - s).min()), float((m + s).max())
    span = max(hi - lo, 0.5)
    ax.set_xlim(max(0.0, lo - 0.6 * span), min(100.0, hi + 0.35 * span) + 0.35 * span)
    for yi, mi, si in zip(y, m, s):
        ax.text(mi + si, yi, f" {mi:.2f}", va="center", fontsize=7.5)
    ax.set_xlabel(f"{task}: test accuracy (%), mean ± std over seeds (axis zoomed)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _colours(tasks: list[str]) -> dict[str, tuple[float, ...]]:
    cmap = colormaps["tab10" if len(tasks) <= 10 else "tab20"]
    return {t: cmap(i % cmap.N) for i, t in enumerate(tasks)}
