"""The figures: one PNG per panel, per-run eval figures, and an overview sheet.

Each panel is a function ``draw_x(ax, runs, opts)`` that draws every run on one axes, so the
same code serves every figure, and several runs overlay with a legend.
Figures are ``matplotlib.figure.Figure`` objects rendered by Agg; nothing here uses pyplot, so
there is no global figure state (the CLI also selects the Agg backend: no GUI toolkit).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from matplotlib import cbook
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from . import stats
from .logs import Run
from .style import COLORS, STEP_LABEL

SPLIT_STYLES = {"val": "--o", "test": ":s"}  # other splits: "-.^"


@dataclass
class Options:
    """How the figures are drawn (the CLI flags)."""

    ema: Optional[float] = None  # EMA factor (weight of the previous average); None: from window
    median_window: Optional[int] = None  # rolling-median window in logged steps; None: ~1%
    points: int = 2000  # bins per drawn line; each keeps its min and max, so <= 2x points
    best_metric: str = "acc"  # picks the best eval (confusion matrix, report)
    dpi: int = 120


def minmax_downsample(x: np.ndarray, y: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``2 * bins`` points of the line ``(x, y)`` that draw the same picture.

    A million steps are far more than a figure's pixel width. Taking every k-th point would
    drop a one-step loss spike; keeping each bin's minimum and maximum, in their original order,
    draws the same envelope with every spike. NaN (a non-finite loss) never wins a bin unless the
    whole bin is NaN, which then stays a gap in the line.
    """
    n = len(y)
    if n <= 2 * bins:
        return x, y
    size = -(-n // bins)  # points per bin, rounded up
    nbins = -(-n // size)
    padded = np.pad(y, (0, nbins * size - n), mode="edge").reshape(nbins, size)
    finite = ~np.isnan(padded)
    lowest = np.where(finite, padded, np.inf).argmin(axis=1)
    highest = np.where(finite, padded, -np.inf).argmax(axis=1)
    index = np.sort(np.stack([lowest, highest], axis=1), axis=1) + size * np.arange(nbins)[:, None]
    index = np.minimum(index.ravel(), n - 1)
    return x[index], y[index]


# ----------------------------------------------------------------------------- helpers

def _color(runs: list[Run], run: Run) -> str:
    return COLORS[runs.index(run) % len(COLORS)]


def _label(runs: list[Run], run: Run, what: str = "") -> str:
    """Legend text: the run's name when several runs share the axes, plus ``what``."""
    if len(runs) == 1:
        return what or run.name
    return f"{run.name}: {what}" if what else run.name


def _line(ax, run: Run, column: str, opts: Options, **style) -> None:
    """Plot ``column`` against step, downsampled for drawing."""
    x, y = minmax_downsample(run.steps["step"].to_numpy(), run.steps[column].to_numpy(dtype=float),
                             opts.points)
    ax.plot(x, y, **style)


def _mark_resumes(ax, runs: list[Run], run: Run) -> None:
    """A dotted vertical line at each step a launch resumed from."""
    for i, step in enumerate(run.resumes):
        ax.axvline(step, color=_color(runs, run), linestyle=":", linewidth=1.2,
                   label=_label(runs, run, "resumed here") if i == 0 else None)


def _mark_nonfinite(ax, runs: list[Run], run: Run, opts: Options) -> None:
    """Red ticks along the bottom at steps whose loss was not finite (logged as null)."""
    steps = run.steps["step"][run.steps["loss"].isna()].to_numpy()
    if len(steps) == 0:
        return
    # One mark per occupied pixel-sized bin is enough: the marks all look the same.
    width = max((run.steps["step"].iloc[-1] - run.steps["step"].iloc[0]) / opts.points, 1)
    steps = np.unique(np.floor(steps / width)) * width
    ax.plot(steps, np.zeros_like(steps), "|", color="red", markersize=12,
            transform=ax.get_xaxis_transform(), label=_label(runs, run, "non-finite loss"))


def _step_axis(ax) -> None:
    """Label the x axis as optimizer steps, written out (``200,000``, not ``0.2 1e6``)."""
    ax.set_xlabel(STEP_LABEL)
    ax.xaxis.set_major_formatter("{x:,.0f}")


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")


# ----------------------------------------------------------------------------- train panels

def draw_loss_raw(ax, runs: list[Run], opts: Options) -> None:
    """Loss of every step, as logged (min/max per bin when there are more steps than pixels)."""
    for run in runs:
        _line(ax, run, "loss", opts, linewidth=0.6, color=_color(runs, run),
              label=_label(runs, run))
        _mark_resumes(ax, runs, run)
        _mark_nonfinite(ax, runs, run, opts)
    ax.set(title="Training loss per step (raw)", ylabel="loss (rank 0 batch)")
    _step_axis(ax)
    _legend(ax)


def draw_loss_smoothed(ax, runs: list[Run], opts: Options) -> None:
    """EMA and rolling median of the loss over the faint raw curve."""
    top, bottom = -math.inf, math.inf
    for run in runs:
        color, loss = _color(runs, run), run.steps["loss"]
        steps = run.steps["step"].to_numpy()
        # Defaults scale with the run: ~1% of its steps (a fixed 0.99 barely moves in 100 steps
        # and is noise over a million).
        window = opts.median_window or stats.median_window(len(loss))
        factor = stats.ema_factor(window) if opts.ema is None else opts.ema
        _line(ax, run, "loss", opts, linewidth=0.5, alpha=0.25, color=color,
              label=_label(runs, run, "raw"))
        x, y = minmax_downsample(steps, stats.ema(loss, factor).to_numpy(), opts.points)
        ax.plot(x, y, "-", linewidth=1.5, color=color,
                label=_label(runs, run, f"EMA (factor {factor:.4g})"))
        top = max(top, np.nanmax(y, initial=-math.inf))
        x, y = _median_line(steps, loss, window, opts.points)
        ax.plot(x, y, "--", linewidth=1.5, color=color,
                label=_label(runs, run, f"rolling median ({window:,} logged steps)"))
        top = max(top, np.nanmax(y, initial=-math.inf))
        bottom = min(bottom, loss.min())  # NaN-skipping; the raw curve's lowest point
        _mark_resumes(ax, runs, run)
    # Raw spikes would set the y range and flatten the smoothed curves (they are in loss_raw):
    # the range runs from the lowest raw loss to the highest smoothed value.
    if math.isfinite(top) and top > bottom:
        margin = 0.05 * (top - bottom)
        ax.set_ylim(bottom - margin, top + margin)
    ax.set(title="Training loss per step, smoothed", ylabel="loss")
    _step_axis(ax)
    _legend(ax)


def _median_line(steps: np.ndarray, loss, window: int, points: int):
    """The rolling-median curve as drawn: ``(x, y)``.

    Neighbouring medians of a wide window share nearly all their values, so the curve is smooth
    at the scale of the window: when the window spans at least 4 of the ``2 * points`` drawing
    positions, the medians are computed only at up to ``2 * points`` evenly spaced steps, about
    8 per window (exact values there). A narrower window can have spikes between drawing
    positions: then every step's median is computed and min/max-binned like the raw loss.
    """
    n = len(steps)
    if window * 2 * points < 4 * n:
        return minmax_downsample(steps, stats.rolling_median(loss, window).to_numpy(), points)
    count = min(n, 2 * points, max(8 * n // window, 2))
    at = np.unique(np.linspace(0, n - 1, count).round().astype(int))
    return steps[at], stats.rolling_median_at(loss.to_numpy(dtype=float), window, at)


def draw_epoch_loss(ax, runs: list[Run], opts: Options) -> None:
    """Mean loss per epoch with the min-max range of its steps as a band."""
    for run in runs:
        color, table = _color(runs, run), stats.epoch_stats(run.steps)
        ax.plot(table.index, table["mean"], "-o", markersize=3, color=color,
                label=_label(runs, run, "mean"))
        ax.fill_between(table.index, table["min"], table["max"], color=color, alpha=0.15,
                        label=_label(runs, run, "min-max"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="Mean training loss per epoch", xlabel="epoch", ylabel="loss")
    _legend(ax)


def draw_lr(ax, runs: list[Run], opts: Options) -> None:
    """Learning rate per step: warmup, then the schedule's decay."""
    for run in runs:
        if "lr" in run.steps:
            _line(ax, run, "lr", opts, linewidth=1.2, color=_color(runs, run),
                  label=_label(runs, run))
            _mark_resumes(ax, runs, run)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.set(title="Learning rate per step", ylabel="learning rate")
    _step_axis(ax)
    _legend(ax)


def draw_loss_reduction(ax, runs: list[Run], opts: Options) -> None:
    """Each epoch's mean loss as % below the initial loss."""
    for run in runs:
        table = stats.epoch_stats(run.steps)
        ax.plot(table.index, table["reduction_pct"], "-o", markersize=3,
                color=_color(runs, run), label=_label(runs, run))
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    initial = (stats.initial_text(runs[0].steps) if len(runs) == 1 else
               f"each run's first {stats.INITIAL_STEPS} steps")
    ax.set(title=f"Loss reduction per epoch vs initial loss ({initial})", xlabel="epoch",
           ylabel="epoch mean loss, % below initial")
    _legend(ax)


def draw_loss_boxplot(ax, runs: list[Run], opts: Options) -> None:
    """Distribution of the step losses of each epoch; runs side by side within an epoch."""
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        color = _color(runs, run)
        epochs = [(epoch, losses) for epoch, losses in stats.loss_epochs(run.steps) if len(losses)]
        ax.bxp(cbook.boxplot_stats([losses for _, losses in epochs]),
               positions=[epoch - 0.4 + width * (i + 0.5) for epoch, _ in epochs],
               widths=0.9 * width, patch_artist=True, manage_ticks=False,
               boxprops={"facecolor": color, "alpha": 0.5}, medianprops={"color": "black"},
               flierprops={"marker": ".", "markersize": 2, "markeredgecolor": color})
    if len(runs) > 1:
        ax.legend(handles=[Patch(color=_color(runs, run), alpha=0.5, label=run.name)
                           for run in runs])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="Training loss distribution per epoch (box: quartiles, whiskers: 1.5 IQR)",
           xlabel="epoch", ylabel="loss")


def draw_throughput(ax, runs: list[Run], opts: Options) -> None:
    """Samples per second of each step, over all ranks."""
    for run in runs:
        if "samples_per_s" in run.steps:
            _line(ax, run, "samples_per_s", opts, linewidth=0.6, color=_color(runs, run),
                  label=_label(runs, run))
            _mark_resumes(ax, runs, run)
    ax.set(title="Throughput per step", ylabel="samples/s (all ranks)")
    _step_axis(ax)
    _legend(ax)


def draw_step_time(ax, runs: list[Run], opts: Options) -> None:
    """Seconds per step, and the part of it spent waiting for data."""
    for run in runs:
        color = _color(runs, run)
        for column, what, alpha in (("step_s", "step time", 1.0), ("data_s", "data wait", 0.5)):
            if column in run.steps:
                _line(ax, run, column, opts, linewidth=0.6, color=color, alpha=alpha,
                      label=_label(runs, run, what))
        _mark_resumes(ax, runs, run)
    ax.set(title="Time per step", ylabel="seconds")
    _step_axis(ax)
    _legend(ax)


# ----------------------------------------------------------------------------- eval panels

def _draw_eval(ax, runs: list[Run], metric: str, name: str, with_train: bool) -> None:
    """``metric`` of every eval split against step; with the train loss when ``with_train``."""
    for run in runs:
        color = _color(runs, run)
        if with_train:
            table = stats.epoch_stats(run.steps)
            ax.plot(table["last_step"], table["mean"], "-", color=color,
                    label=_label(runs, run, "train loss (epoch mean)"))
        for split in stats.splits(run):
            frame = stats.eval_frame(run, split)
            ax.plot(frame["step"], frame[metric], SPLIT_STYLES.get(split, "-.^"), markersize=4,
                    color=color, label=_label(runs, run, f"{split} {name}"))
    ax.set(ylabel=name)
    _step_axis(ax)
    _legend(ax)


def draw_eval_loss(ax, runs: list[Run], opts: Options) -> None:
    """Eval loss per eval vs the train loss per epoch: the over-fitting check."""
    _draw_eval(ax, runs, "loss", "loss", with_train=True)
    ax.set_title("Train vs eval loss (over-fitting check)")


def draw_eval_acc(ax, runs: list[Run], opts: Options) -> None:
    """Accuracy of each eval."""
    _draw_eval(ax, runs, "acc", "accuracy", with_train=False)
    ax.set_title("Eval accuracy (fraction correct)")


def draw_eval_f1(ax, runs: list[Run], opts: Options) -> None:
    """Macro-F1 of each eval."""
    _draw_eval(ax, runs, "macro_f1", "macro-F1", with_train=False)
    ax.set_title("Eval macro-F1")
