"""Write the figures: one PNG per panel, the per-class PNGs, and the overview sheet."""
from __future__ import annotations

import os
from typing import Callable, Optional

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from . import classes
from .figures import (Options, draw_epoch_loss, draw_eval_acc, draw_eval_f1,
                      draw_eval_loss, draw_loss_boxplot, draw_loss_raw, draw_loss_reduction,
                      draw_loss_smoothed, draw_lr, draw_step_time, draw_throughput)
from .logs import Run
from .style import STYLE


def _always(runs: list[Run]) -> bool:
    return True


def _has_evals(runs: list[Run]) -> bool:
    return any(run.evals for run in runs)


def _has(column: str) -> Callable[[list[Run]], bool]:
    return lambda runs: any(column in run.steps for run in runs)


# (file name, panel, whether the logs hold what it needs), in the order of the overview.
PANELS = [
    ("loss_raw", draw_loss_raw, _always),
    ("loss_smoothed", draw_loss_smoothed, _always),
    ("loss_per_epoch", draw_epoch_loss, _always),
    ("lr", draw_lr, _has("lr")),
    ("loss_reduction", draw_loss_reduction, _always),
    ("loss_boxplot", draw_loss_boxplot, _always),
    ("eval_loss", draw_eval_loss, _has_evals),
    ("eval_acc", draw_eval_acc, _has_evals),
    ("eval_macro_f1", draw_eval_f1, _has_evals),
    ("throughput", draw_throughput, _has("samples_per_s")),
    ("step_time", draw_step_time, _has("step_s")),
]
OVERVIEW_COLUMNS = 3


def save_figures(runs: list[Run], out_dir: str, opts: Options) -> list[str]:
    """Write every figure the logs allow into ``out_dir``; return the file names, in order."""
    os.makedirs(out_dir, exist_ok=True)
    panels = [(name, draw) for name, draw, wanted in PANELS if wanted(runs)]
    written, tiles = [], []
    with matplotlib.rc_context(STYLE):
        for name, draw in panels:
            fig = _figure(runs, (9, 5), opts.dpi, layout=None)
            fig.subplots_adjust(left=0.09, right=0.97, bottom=0.11, top=0.86)
            draw(fig.add_subplot(), runs, opts)
            written.append(_save(fig, out_dir, name))
            tiles.append(np.asarray(fig.canvas.buffer_rgba()).copy())  # the pixels just saved
        overview = _save_overview(out_dir, tiles)
        written += _save_class_figures(runs, out_dir, opts)
    return written + [overview]


def _figure(runs: list[Run], size: tuple[float, float], dpi: int,
            layout: Optional[str] = "constrained", title: str = "") -> Figure:
    """An empty figure titled ``title``, else by its runs, so a PNG alone says what it shows.

    The one-panel figures use fixed margins (``layout=None``): the constrained layout engine
    measures every text before drawing, which makes saving ~1.5x slower.
    """
    fig = Figure(figsize=size, dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)  # attaches itself; savefig at the figure's dpi leaves its pixels there
    fig.suptitle(title or ", ".join(run.name for run in runs))
    return fig


def _save(fig: Figure, out_dir: str, name: str) -> str:
    fig.savefig(os.path.join(out_dir, f"{name}.png"), dpi="figure")
    return f"{name}.png"


def _save_class_figures(runs: list[Run], out_dir: str, opts: Options) -> list[str]:
    """class_f1.png and confusion.png: one row of panels per run that has the numbers."""
    written = []
    with_f1 = [run for run in runs if classes.has_per_class(run)]
    if with_f1:
        fig = _figure(with_f1, (9, 4.5 * len(with_f1)), opts.dpi,
                      title="Per-class F1 at each eval")
        for ax, run in zip(fig.subplots(len(with_f1), 1, squeeze=False)[:, 0], with_f1):
            classes.draw_class_f1(ax, run, opts)
        written.append(_save(fig, out_dir, "class_f1"))
    with_matrix = [run for run in runs if classes.has_confusion(run, opts.best_metric)]
    if with_matrix:
        fig = _figure(with_matrix, (13, 5.5 * len(with_matrix)), opts.dpi,
                      title=f"Confusion matrix of the best eval by {opts.best_metric}")
        for axes, run in zip(fig.subplots(len(with_matrix), 2, squeeze=False), with_matrix):
            classes.draw_confusion(axes, run, opts)
        written.append(_save(fig, out_dir, "confusion"))
    return written


def _save_overview(out_dir: str, tiles: list[np.ndarray]) -> str:
    """Tile the one-panel figures' pixels (RGBA), three per row, into overview.png.

    The panels are rendered at the same size, so tiling their pixels gives the same sheet as
    drawing every panel again into one big figure, for a fraction of the time.
    """
    tiles = tiles + [np.full_like(tiles[0], 255)] * (-len(tiles) % OVERVIEW_COLUMNS)  # white
    rows = [np.concatenate(tiles[i:i + OVERVIEW_COLUMNS], axis=1)
            for i in range(0, len(tiles), OVERVIEW_COLUMNS)]
    # RGB (the figures are opaque) through Pillow, which matplotlib already depends on.
    Image.fromarray(np.concatenate(rows, axis=0)[..., :3]).save(
        os.path.join(out_dir, "overview.png"))
    return "overview.png"
