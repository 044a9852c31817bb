"""report.md of a cross-validation (``ddp-train cv``): per-fold metrics with their mean ± std,
out-of-fold metrics, the fold ensemble on test, and two figures.

Like :mod:`.sweep` this renders plain dicts (``summary.json``) with numpy and matplotlib only
(no torch), drawing ``Figure`` objects with Agg; every file is written to a temporary name and
moved into place.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .style import COLORS, STYLE, replace_file

DPI = 120
BAR_METRICS = ("acc", "macro_f1")


def write_cv_report(out_dir: str, summary: dict) -> str:
    """Write ``<out_dir>/report.md`` with ``cv_folds.png`` and ``oof_confusion.png``; return
    the report's path. ``summary`` is ``summary.json``'s dict."""
    os.makedirs(out_dir, exist_ok=True)
    folds = summary.get("per_fold", [])
    lines = [f"# Cross-validation: {summary.get('name', '')}", "",
             f"{summary.get('num_folds')} folds of `{summary.get('shards')}` · scored with each "
             f"fold's `{summary.get('oof_checkpoint')}` checkpoint · generated "
             f"{summary.get('generated', '')}", ""]
    if not summary.get("complete", True):
        lines += [f"Only folds {', '.join(map(str, summary.get('folds', [])))} were collected: "
                  "the OOF predictions cover their samples only.", ""]
    lines += ["## Per-fold val metrics", "", *_fold_table(summary), ""]
    oof = summary.get("oof") or {}
    lines += ["## Out-of-fold (every train sample, scored by the fold model that never saw it)",
              "", f"{oof.get('count', 0)} samples · acc {_num(oof.get('acc'))} · macro-F1 "
              f"{_num(oof.get('macro_f1'))} · NLL {_num(oof.get('nll'))} · ECE "
              f"{_num(oof.get('ece'))}", "", *_class_table(oof), ""]
    test = summary.get("test")
    lines += ["## Test: the fold ensemble (equal weights, each fold's temperature)", ""]
    if test:
        lines += [f"{test['count']} samples · acc {_num(test['acc'])} · macro-F1 "
                  f"{_num(test['macro_f1'])} · NLL {_num(test['nll'])} · ECE "
                  f"{_num(test['ece'])}", "",
                  *_table(["member", "acc", "macro_f1", "nll", "T"],
                          [[f"fold {m['fold']}", _num(m["acc"]), _num(m["macro_f1"]),
                            _num(m["nll"]), _num(m["temperature"])] for m in test["members"]]),
                  "", *_class_table(test), ""]
    else:
        lines += ["The dataset has no test split.", ""]
    lines += ["## Figures", ""]
    with matplotlib.rc_context(STYLE):
        for name, draw, ok in (("cv_folds", _draw_folds, bool(folds)),
                               ("oof_confusion", _draw_confusion, bool(oof.get("count")))):
            if not ok:
                continue
            fig = Figure(figsize=(8, 5) if name == "cv_folds" else (7, 6), dpi=DPI,
                         layout="constrained")
            FigureCanvasAgg(fig)
            draw(fig, summary)
            replace_file(os.path.join(out_dir, f"{name}.png"),
                     lambda f: fig.savefig(f, format="png", dpi="figure"))
            lines += [f"![{name}]({name}.png)", ""]
    path = os.path.join(out_dir, "report.md")
    replace_file(path, lambda f: f.write("\n".join(lines).encode("utf-8")))
    return path


def _num(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def _spread_cell(spread: Optional[dict]) -> str:
    return "–" if not spread else f"{spread['mean']:.4f} ± {spread['std']:.4f}"


def _fold_table(summary: dict) -> list[str]:
    """One row per fold (val at its last and best eval, and its OOF score), then mean ± std."""
    rows = []
    for f in summary.get("per_fold", []):
        last, best = f["val"]["last"] or {}, f["val"]["best"] or {}
        rows.append([str(f["fold"]), _num(last.get("acc")), _num(last.get("macro_f1")),
                     _num(best.get("acc")), _num(best.get("macro_f1")),
                     _num(f["oof"]["acc"]), _num(f["oof"]["macro_f1"]), str(f["oof"]["count"]),
                     f"{f['checkpoint_kind']}, T={_num(f['temperature'], 3)}"])
    spread = summary.get("mean_std", {})
    rows.append(["**mean ± std**", *(_spread_cell(spread.get(s, {}).get(m))
                                     for s in ("val_last", "val_best", "oof")
                                     for m in ("acc", "macro_f1")), "", ""])
    return _table(["fold", "val acc (last)", "val F1 (last)", "val acc (best)", "val F1 (best)",
                   "OOF acc", "OOF F1", "samples", "scored with"], rows)


def _class_table(metrics: dict) -> list[str]:
    return _table(["class", "precision", "recall", "f1", "support"],
                  [[str(c["class"]), _num(c["precision"]), _num(c["recall"]), _num(c["f1"]),
                    str(c["support"])] for c in metrics.get("per_class", [])])


def _fold_values(summary: dict, metric: str) -> np.ndarray:
    """Per-fold values of ``metric``: the last val record, else the fold's OOF score (the same
    model on the same samples when the run evaluated at its last step)."""
    return np.array([float(((f["val"]["last"] or {}).get(metric)) if f["val"]["last"]
                           else f["oof"][metric]) for f in summary["per_fold"]])


def _draw_folds(fig: Figure, summary: dict) -> None:
    """Bars of each fold's val acc and macro-F1, with the mean as a line and ± std as a band."""
    ax = fig.add_subplot()
    folds = [f["fold"] for f in summary["per_fold"]]
    x, width = np.arange(len(folds)), 0.8 / len(BAR_METRICS)
    for i, metric in enumerate(BAR_METRICS):
        values = _fold_values(summary, metric)
        mean, std = values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0
        ax.bar(x + (i - (len(BAR_METRICS) - 1) / 2) * width, values, width, color=COLORS[i],
               label=f"{metric}: {mean:.4f} ± {std:.4f}")
        ax.axhline(mean, color=COLORS[i], linestyle="--", linewidth=1)
        ax.axhspan(mean - std, mean + std, color=COLORS[i], alpha=0.12)
    ax.set_xticks(x, [f"fold {k}" for k in folds])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("val metric (mean ± std dashed/band)")
    ax.legend(loc="lower right")
    fig.suptitle(f"{summary.get('name', '')}: per-fold val metrics")


def _draw_confusion(fig: Figure, summary: dict) -> None:
    """The OOF confusion matrix, rows normalised to recall, with the counts written in."""
    ax = fig.add_subplot()
    counts = np.array(summary["oof"]["confusion_matrix"], dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    classes = summary.get("classes") or [str(i) for i in range(len(counts))]
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 8 else 0)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.grid(False)
    if len(classes) <= 20:  # beyond that the numbers no longer fit their cells
        for (i, j), n in np.ndenumerate(counts):
            ax.text(j, i, f"{int(n)}", ha="center", va="center", fontsize="x-small",
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, label="fraction of the true class")
    fig.suptitle(f"{summary.get('name', '')}: out-of-fold confusion matrix "
                 f"(acc {summary['oof']['acc']:.4f})")
