"""The report's PNG plots, drawn headless on matplotlib's Agg canvas (no display, no pyplot
global state). Each function takes report Entries (mlic_dist.report) and returns the path it
wrote, or None when there is nothing to draw."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .. import metrics
from ..atomic import replace_with


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    with replace_with(path) as tmp:   # keeps the .png suffix: savefig picks the format by it
        fig.savefig(tmp)
    return path


def per_class_ap(path: Path, single, ensemble, split: str) -> Optional[Path]:
    """Grouped bars: per-class AP of the best single run and of the best ensemble."""
    shown = [e for e in (single, ensemble) if e is not None]
    if not shown:
        return None
    classes = shown[0].run.classes
    fig = _figure(max(6.0, 0.35 * len(classes) + 2), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    width = 0.8 / len(shown)
    for i, e in enumerate(shown):
        s = e.run.split(split)
        ap = metrics.average_precision(s.scores, s.targets)
        kind = "ensemble" if e.is_ensemble else "single"
        ax.bar(x + i * width - 0.4 + width / 2, 100 * np.nan_to_num(ap), width,
               label=f"{kind}: {e.name} (mAP {100 * metrics.nanmean(ap):.1f})")
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"AP on {split} (%)")
    ax.set_title("Per-class AP: best ensemble vs best single model\n(both chosen on validation)", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def pr_curves(path: Path, entries: Sequence, split: str, max_classes: int = 16) -> Optional[Path]:
    """Precision-recall curves per class (small multiples), one line per entry."""
    from sklearn.metrics import precision_recall_curve

    if not entries:
        return None
    classes = entries[0].run.classes[:max_classes]
    cols = min(4, len(classes))
    rows = int(np.ceil(len(classes) / cols))
    fig = _figure(3.0 * cols, 2.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    for c, name in enumerate(classes):
        ax = axes[c // cols][c % cols]
        for e in entries:
            s = e.run.split(split)
            keep = s.targets[:, c] != -1
            y = s.targets[keep, c] == 1
            if y.any():
                p, r, _ = precision_recall_curve(y, s.scores[keep, c])
                ax.plot(r, p, label=e.name, drawstyle="steps-post")
        ax.set_title(name, fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.tick_params(labelsize=7)
    for c in range(len(classes), rows * cols):
        axes[c // cols][c % cols].set_visible(False)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Precision-recall on {split} (x: recall, y: precision)"
                 + (f", first {max_classes} classes" if len(entries[0].run.classes) > max_classes else ""))
    return _save(fig, path)


def training_curves(path: Path, runs: Sequence) -> Optional[Path]:
    """train_loss, val_loss and val_mAP per epoch of every training run (history.jsonl)."""
    runs = [e for e in runs if e.run.history]
    if not runs:
        return None
    fig = _figure(13.0, 3.8)
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("train_loss", "val_loss", "val_mAP")):
        for e in runs:
            points = [(h["epoch"], h[key]) for h in e.run.history if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=e.name)
        ax.set_xlabel("epoch")
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def ensemble_members(path: Path, ensembles: Sequence[tuple[str, float, list]], split: str) -> Optional[Path]:
    """One row per ensemble: its members' mAP (dots) and the ensemble's (a star)."""
    if not ensembles:
        return None
    fig = _figure(8.0, 1.0 + 0.5 * len(ensembles))
    ax = fig.add_subplot()
    for y, (name, value, members) in enumerate(ensembles):
        vals = [100 * v for _, v in members if v == v]
        ax.scatter([100 * value], [y], marker="*", s=220, color="tab:red", alpha=0.6, zorder=2,
                   label="ensemble" if y == 0 else None)
        ax.scatter(vals, [y] * len(vals), s=18, color="tab:blue", zorder=3, label="members" if y == 0 else None)
    ax.set_yticks(range(len(ensembles)), [e[0] for e in ensembles], fontsize=8)
    ax.set_xlabel(f"mAP on {split} (%)")
    ax.set_title("Ensembles vs their members")
    ax.legend(fontsize=8)
    return _save(fig, path)
