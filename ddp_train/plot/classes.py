"""Per-class figures of one run: F1 of each class over the evals, and the best eval's confusion
matrix. They come from eval.jsonl (``per_class``, ``confusion_matrix``) of the run's main split.
"""
from __future__ import annotations

import numpy as np

from . import stats
from .figures import Options
from .logs import Run

ANNOTATE_MAX = 20  # write the value into each cell up to this many classes
TICKS_MAX = 40  # name every class on the axes up to this many classes


def has_per_class(run: Run) -> bool:
    """Whether the run's main split has evals with per-class numbers."""
    split = stats.main_split(run)
    return any(r.get("split") == split and r.get("per_class") for r in run.evals)


def has_confusion(run: Run, metric: str) -> bool:
    """Whether the best eval by ``metric`` carries a confusion matrix."""
    record = stats.best_eval(run, metric)
    return bool(record and record.get("confusion_matrix"))


def _class_names(record: dict, count: int) -> list[str]:
    names = [str(c.get("class")) for c in record.get("per_class") or []]
    return names if len(names) == count else [str(i) for i in range(count)]


def _name_classes(ax, names: list[str], axis: str) -> None:
    """Label each row/column with its class name while they fit."""
    if len(names) <= TICKS_MAX:
        set_ticks = ax.set_xticks if axis == "x" else ax.set_yticks
        set_ticks(range(len(names)), labels=names)


def draw_class_f1(ax, run: Run, opts: Options) -> None:
    """Heatmap of per-class F1: one row per class, one column per eval of the main split."""
    split = stats.main_split(run)
    frame = stats.eval_frame(run, split)
    evals = [(step, run.evals[i]["per_class"]) for step, i in zip(frame["step"], frame["record"])
             if run.evals[i].get("per_class")]
    classes = len(evals[-1][1])
    evals = [(step, per_class) for step, per_class in evals if len(per_class) == classes]
    f1 = np.array([[stats.number(c.get("f1")) for c in per_class] for _, per_class in evals])
    image = ax.imshow(f1.T, aspect="auto", interpolation="nearest", vmin=0, vmax=1)
    ticks = np.unique(np.linspace(0, len(evals) - 1, min(len(evals), 8)).round().astype(int))
    ax.set_xticks(ticks, labels=[f"{evals[t][0]:,}" for t in ticks])
    _name_classes(ax, [str(c.get("class")) for c in evals[-1][1]], "y")
    ax.figure.colorbar(image, ax=ax, label="F1")
    ax.grid(False)
    ax.set(title=f"{run.name}: F1 of each class on {split}", xlabel=f"{split} eval at step",
           ylabel="class")


def draw_confusion(axes, run: Run, opts: Options) -> None:
    """Confusion matrix of the best eval: counts, and rows normalised to 1 (per-class recall)."""
    record = stats.best_eval(run, opts.best_metric)
    counts = np.array(record["confusion_matrix"], dtype=float)
    names = _class_names(record, len(counts))
    normalised = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)  # rows: true class
    title = f"{run.name}: {record['split']} at step {record['step']:,}"
    panels = ((axes[0], counts, f"{title}, counts", "{:,.0f}"),
              (axes[1], normalised, "rows normalised to 1 (recall of each class)", "{:.2f}"))
    for ax, values, what, fmt in panels:
        image = ax.imshow(values, cmap="Blues", interpolation="nearest")
        ax.figure.colorbar(image, ax=ax)
        if len(values) <= ANNOTATE_MAX:
            _annotate(ax, values, fmt)
        _name_classes(ax, names, "x")
        _name_classes(ax, names, "y")
        ax.grid(False)
        ax.set(title=what, xlabel="predicted class", ylabel="true class")


def _annotate(ax, values: np.ndarray, fmt: str) -> None:
    """Write each cell's value, white on dark cells."""
    dark = values.max() / 2
    for (row, col), value in np.ndenumerate(values):
        if value:
            ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize="x-small",
                    color="white" if value > dark else "black")
