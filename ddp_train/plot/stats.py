"""Numbers derived from a :class:`~ddp_train.plot.logs.Run`.

The figures and the report both take their numbers from here, so a value in report.md is the
value drawn in the figure next to it. Every function only aggregates what the logs hold.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from .logs import Run

INITIAL_STEPS = 10  # "initial loss" = mean loss of the first 10 steps (one step is noise)
PLATEAU_GAIN = 0.005  # a metric within 0.5 points of its best counts as plateaued...
PLATEAU_EVALS = 3  # ...when at least this many evals follow the first such eval
OVERFIT_RISE = 0.05  # val loss more than 5% above its minimum at the last eval is a rise
METRICS = ("loss", "acc", "macro_f1")


def number(value) -> float:
    """A log value as a float; NaN for null (a non-finite value), absent or non-numeric."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# ----------------------------------------------------------------------------- train loss

def initial_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """The steps that define the initial loss: those with a finite loss among the first
    :data:`INITIAL_STEPS` steps from the first finite one (by step number, not by line).

    Counting by step number keeps a sparse log honest: a train.log has one line every
    ``log.interval`` steps, and its first 10 lines would span most of a short run.
    """
    finite = steps[steps["loss"].notna()]
    first = finite["step"].iloc[0]
    return finite[finite["step"] < first + INITIAL_STEPS]


def initial_loss(steps: pd.DataFrame) -> float:
    """Mean loss of :func:`initial_steps`: the baseline of the loss-reduction numbers."""
    return float(initial_steps(steps)["loss"].mean())


def initial_text(steps: pd.DataFrame) -> str:
    """What the initial loss is, for titles and the report: ``mean of steps 1–10``."""
    chosen = initial_steps(steps)["step"]
    if len(chosen) == 1:
        return f"step {chosen.iloc[0]:,}, the first logged"
    return f"mean of the {len(chosen)} logged steps {chosen.iloc[0]:,}–{chosen.iloc[-1]:,}"


def epoch_stats(steps: pd.DataFrame) -> pd.DataFrame:
    """Per epoch (index): steps, last_step, loss mean/min/max, and % reduction from the start.

    ``reduction_pct`` is ``100 * (1 - mean / initial_loss)``: how far the epoch's mean loss is
    below the initial loss. Non-finite losses (NaN) are left out of the means.
    """
    groups = steps.groupby("epoch")
    table = groups["loss"].agg(["mean", "min", "max"])
    table["steps"] = groups.size()
    table["last_step"] = groups["step"].max()
    table["reduction_pct"] = 100 * (1 - table["mean"] / initial_loss(steps))
    return table


def ema(values: pd.Series, factor: float) -> pd.Series:
    """Exponential moving average, ``s_t = factor * s_(t-1) + (1 - factor) * x_t``.

    Bias-corrected at the start (as TensorBoard's smoothing), and NaN values are skipped rather
    than poisoning every later value.
    """
    return values.ewm(alpha=1 - factor, adjust=True, ignore_na=True).mean()


def median_window(num_steps: int) -> int:
    """Default smoothing window: about 1% of the steps, odd, at least 5."""
    return max(5, num_steps // 100 // 2 * 2 + 1)


def ema_factor(window: int) -> float:
    """The EMA factor that averages over about ``window`` steps (pandas' ``span``)."""
    return 1 - 2 / (window + 1)


def rolling_median(values: pd.Series, window: int) -> pd.Series:
    """Centred rolling median over ``window`` steps; robust to the loss spikes an EMA smears."""
    return values.rolling(window, center=True, min_periods=1).median()


def rolling_median_at(values: np.ndarray, window: int, at: np.ndarray) -> np.ndarray:
    """:func:`rolling_median` at the positions ``at`` only, with the same values.

    A figure draws a few thousand points, and pandas' rolling median costs ~2 s for a million
    steps at the default window; computing the medians only where they are drawn costs
    ``len(at) * window`` element moves instead. NaN (a non-finite loss) is skipped, as pandas
    does; a window of NaN only gives NaN.
    """
    half = window // 2  # pandas' centred window at i: i - half ... i - half + window - 1
    padded = np.concatenate([np.full(half, np.nan), values, np.full(window, np.nan)])
    windows = sliding_window_view(padded, window)  # a view: nothing copied yet
    out = np.empty(len(at))
    rows = max(1, (4 << 20) // window)  # copy ~4M values (32 MB) at a time
    for start in range(0, len(at), rows):
        block = windows[at[start:start + rows]]
        if np.isnan(block).any():
            with warnings.catch_warnings():  # "All-NaN slice": NaN is the intended answer
                warnings.simplefilter("ignore", RuntimeWarning)
                out[start:start + rows] = np.nanmedian(block, axis=1)
        else:
            out[start:start + rows] = np.median(block, axis=1)
    return out


def loss_epochs(steps: pd.DataFrame) -> list[tuple[int, np.ndarray]]:
    """``(epoch, finite losses of its steps)`` for each epoch, for box plots."""
    return [(int(epoch), group.dropna().to_numpy())
            for epoch, group in steps.groupby("epoch")["loss"]]


# ----------------------------------------------------------------------------- throughput

def throughput(steps: pd.DataFrame) -> dict:
    """Median and 5th/95th percentile samples/s, mean step time, share of time waiting for data."""
    out = {}
    if "samples_per_s" in steps:
        rate = steps["samples_per_s"].dropna()
        out.update(median=rate.median(), p5=rate.quantile(0.05), p95=rate.quantile(0.95))
    if "step_s" in steps:
        out["step_s"] = steps["step_s"].mean()
        out["step_s_total"] = steps["step_s"].sum()
        if "data_s" in steps:
            out["data_share"] = steps["data_s"].sum() / out["step_s_total"]
    return out


def wall_time(run: Run) -> float:
    """Seconds from the first to the last record with a time (steps, evals, events)."""
    if run.text_wall_s is not None:
        return run.text_wall_s
    times = list(run.steps["time"].dropna()) if "time" in run.steps else []
    times += [number(r.get("time")) for r in run.evals + run.starts]
    times += [number(run.end.get("time"))] if run.end else []
    times = [t for t in times if not math.isnan(t)]
    return max(times) - min(times) if times else math.nan


# ----------------------------------------------------------------------------- evals

def eval_frame(run: Run, split: str) -> pd.DataFrame:
    """One row per eval of ``split``, by step: step, epoch, loss, acc, macro_f1, record.

    ``epoch`` is the epoch of the last train step at or before the eval (the one the eval
    closes), which is how evals line up with the per-epoch train loss. ``record`` indexes
    ``run.evals``, for the per-class numbers and the confusion matrix.
    """
    rows = [{"step": int(r["step"]), **{m: number(r.get(m)) for m in METRICS}, "record": i}
            for i, r in enumerate(run.evals) if r.get("split") == split]
    frame = pd.DataFrame(rows, columns=["step", *METRICS, "record"])
    steps = run.steps["step"].to_numpy()
    last = np.searchsorted(steps, frame["step"].to_numpy(), side="right") - 1
    frame.insert(1, "epoch", run.steps["epoch"].to_numpy()[np.clip(last, 0, None)])
    return frame


def eval_at(frame: pd.DataFrame, row: int) -> dict:
    """Row ``row`` (position) of an :func:`eval_frame` as a dict with int step/epoch/record."""
    values = frame.iloc[row].to_dict()  # a row of mixed columns comes back as floats
    return {**values, **{k: int(values[k]) for k in ("step", "epoch", "record")}}


def splits(run: Run) -> list[str]:
    """The eval splits in the logs: the chosen one (``run.split``, ``--split``), then val, then
    the others by name."""
    names = {r.get("split") for r in run.evals} - {None}
    return sorted(names, key=lambda name: (name != run.split, name != "val", name))


def main_split(run: Run) -> Optional[str]:
    """The split that picks the best eval and fills the per-epoch table and per-class figures:
    ``run.split`` (``--split``, e.g. val_ema), else val when logged, else the first by name."""
    names = splits(run)
    return names[0] if names else None


def best_row(frame: pd.DataFrame, metric: str) -> Optional[int]:
    """Index of the best eval in ``frame`` by ``metric`` (lowest loss, highest acc/macro_f1).

    Ties go to the earliest eval, as with early stopping's best.pt. None if there is no value.
    """
    values = frame[metric].reset_index(drop=True)
    if values.isna().all():
        return None
    return int(values.idxmin() if metric == "loss" else values.idxmax())


def best_eval(run: Run, metric: str) -> Optional[dict]:
    """The record of the best eval of :func:`main_split` by ``metric``; None without evals."""
    split = main_split(run)
    frame = eval_frame(run, split) if split else None
    row = best_row(frame, metric) if frame is not None and len(frame) else None
    return None if row is None else run.evals[eval_at(frame, row)["record"]]


def epoch_table(run: Run) -> pd.DataFrame:
    """:func:`epoch_stats` joined with the last eval of :func:`main_split` of each epoch.

    The eval columns are ``eval_step``, ``eval_loss``, ``eval_acc``, ``eval_macro_f1`` (NaN for
    epochs without an eval).
    """
    table = epoch_stats(run.steps)
    evals = eval_frame(run, main_split(run) or "val")
    last = evals.drop_duplicates("epoch", keep="last").set_index("epoch")
    return table.join(last[["step", *METRICS]].add_prefix("eval_"))


def plateau(frame: pd.DataFrame, metric: str) -> Optional[tuple[int, int]]:
    """Where ``metric`` (acc or macro_f1) stopped improving: ``(row, evals after it)``.

    The row is the first eval whose best-so-far is within :data:`PLATEAU_GAIN` of the final
    best. Slow, steady gains keep moving it later, so they are not mistaken for a plateau.
    """
    values = frame[metric].to_numpy(dtype=float)
    if np.isnan(values).all():
        return None
    best_so_far = np.fmax.accumulate(values)  # fmax ignores NaN evals
    row = int(np.argmax(best_so_far >= np.nanmax(values) - PLATEAU_GAIN))
    return row, len(values) - 1 - row


def train_loss_at(table: pd.DataFrame, epoch: int) -> float:
    """Mean train loss of ``epoch`` (NaN if the epoch has no steps)."""
    return float(table["mean"].get(epoch, math.nan))
