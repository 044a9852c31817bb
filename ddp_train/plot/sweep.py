"""report.md of a hyperparameter sweep: the best trial, a table of every trial, three figures.

The sweep command turns its Optuna study into plain dicts (a summary and one dict per trial) and
hands them here, so this module needs numpy and matplotlib only: no torch, no optuna, and it can
be tested with hand-written trials. Like :mod:`.render`, figures are ``Figure`` objects drawn by
Agg (no pyplot, no global state). The report is rewritten while the sweep runs, so every file is
written to a temporary name and moved into place: a reader never sees half a file.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from .style import COLORS, STEP_LABEL, STYLE, replace_file

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
          "WAITING": "waiting"}  # Optuna's trial states, in the order the counts are written
LEGEND_TRIALS = 10  # curves.png names at most this many trials: more would hide the curves
DPI = 120


def write_sweep_report(out_dir: str, summary: dict, trials: list[dict]) -> str:
    """Write ``<out_dir>/report.md`` plus its PNGs (history, importances, curves); return its path.

    ``summary`` describes the study (name, metric, direction, storage, best trial number,
    importances, best_yaml, generated); ``trials`` holds one dict per trial, as the sweep command
    builds them. Any of them may be empty, failed or NaN: the report then says what is missing.
    """
    os.makedirs(out_dir, exist_ok=True)
    trials = sorted(trials, key=lambda t: t["number"])
    best = next((t for t in trials if t["number"] == summary.get("best")), None)
    metric = summary.get("metric", "value")
    lines = [f"# Sweep report: {summary.get('name', '')}", "",
             f"Metric: val `{metric}`, {summary.get('direction', 'maximize')} · "
             f"{_counts(trials)} · storage: `{summary.get('storage', '')}` · "
             f"generated {summary.get('generated', '')}", ""]
    lines += _best_section(summary, trials, best, metric)
    lines += ["## Trials", "", *_trial_table(trials, best, metric)]
    lines += ["## Figures", ""]
    figures = [("history", "Optimisation history", _draw_history, _history_missing),
               ("importances", "Parameter importances", _draw_importances, _importances_missing),
               ("curves", f"Val {metric} of every trial", _draw_curves, _curves_missing)]
    with matplotlib.rc_context(STYLE):
        for name, title, draw, missing in figures:
            path = os.path.join(out_dir, f"{name}.png")
            reason = missing(summary, trials)
            if reason:
                if os.path.exists(path):  # from an earlier report: no longer linked, and stale
                    os.remove(path)
                lines += [f"{reason}", ""]
                continue
            fig = Figure(figsize=(9, 5), dpi=DPI, layout="constrained")
            FigureCanvasAgg(fig)
            fig.suptitle(f"{summary.get('name', '')}: {title.lower()}")
            draw(fig.add_subplot(), summary, trials, best)
            replace_file(path, lambda f: fig.savefig(f, format="png", dpi="figure"))
            lines += [f"![{name}]({name}.png)", ""]
    # Last, so the report only ever links figures that are complete on disk.
    path = os.path.join(out_dir, "report.md")
    replace_file(path, lambda f: f.write("\n".join(lines).encode("utf-8")))
    return path


# ----------------------------------------------------------------------------- numbers

def _float(value) -> float:
    """``value`` as a float; None (no value yet) and anything unreadable as NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _curve(trial: dict) -> np.ndarray:
    """The trial's ``[[step, value], ...]`` as an (n, 2) float array, unreadable values NaN."""
    points = [(_float(p[0]), _float(p[1])) for p in trial.get("curve") or () if len(p) >= 2]
    return np.array(points, dtype=float).reshape(-1, 2)


def _last_value(trial: dict) -> float:
    """The last finite value of the trial's curve: where a pruned trial was stopped."""
    values = _curve(trial)[:, 1]
    values = values[np.isfinite(values)]
    return values[-1] if len(values) else math.nan


def _complete(trials: list[dict]) -> list[dict]:
    """The COMPLETE trials with a finite value: the ones an optimisation history can plot."""
    return [t for t in trials if t["state"] == "COMPLETE" and math.isfinite(_float(t["value"]))]


def _metric(value) -> str:
    """A metric value: 4 decimals like report.md; "–" when absent, "NaN" when not a number."""
    if value is None:
        return "–"
    value = _float(value)
    return "NaN" if math.isnan(value) else f"{value:.4f}"


def _cell(value) -> str:
    """A table cell: floats in 4 significant digits, blank when absent, pipes escaped."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _duration(seconds) -> str:
    seconds = _float(seconds)
    if not math.isfinite(seconds):
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"  # h:mm:ss, hours past 24 included


def _counts(trials: list[dict]) -> str:
    """``5 trials: 3 complete, 1 pruned, 1 failed`` (states with no trial left out)."""
    states = [t["state"] for t in trials]
    order = list(STATES) + sorted(set(states) - set(STATES))
    parts = [f"{states.count(s)} {STATES.get(s, s.lower())}" for s in order if s in states]
    return f"{len(trials)} trial{'' if len(trials) == 1 else 's'}" + (
        f": {', '.join(parts)}" if parts else "")


# ----------------------------------------------------------------------------- sections

def _best_section(summary: dict, trials: list[dict], best: Optional[dict],
                  metric: str) -> list[str]:
    if best is None:
        return ["## Best trial", "",
                f"No complete trial yet ({_counts(trials)}): no best parameters to retrain with.",
                ""]
    steps = f", after {best['steps']:,} steps" if best.get("steps") is not None else ""
    lines = ["## Best trial", "",
             f"Trial **{best['number']}**: val {metric} {_metric(best['value'])} "
             f"({summary.get('direction', 'maximize')}){steps}, in {_duration(best['wall_s'])}; "
             f"run folder `{best.get('run_dir', '')}`.", ""]
    # The exact values, not the table's 4 digits: they are what best.yaml holds.
    lines += _table(["param", "value"], [[k, f"`{v}`"] for k, v in best["params"].items()])
    if summary.get("best_yaml"):
        lines += [f"Its full config is `{summary['best_yaml']}`; to retrain with it:", "",
                  "```", f"ddp-train --config {summary['best_yaml']}", "```", ""]
    else:
        lines += ["No best.yaml was written for it.", ""]
    return lines


def _trial_table(trials: list[dict], best: Optional[dict], metric: str) -> list[str]:
    if not trials:
        return ["No trials yet.", ""]
    # One column per config key any trial sampled, sorted so keys of one section sit together.
    params = sorted({key for t in trials for key in t.get("params") or {}})
    header = ["trial", "state", *params, f"val {metric}", "steps", "wall", "note"]
    rows = []
    for t in trials:
        number = f"**{t['number']}** ★" if t is best else str(t["number"])
        steps = "–" if t.get("steps") is None else f"{t['steps']:,}"
        rows.append([number, STATES.get(t["state"], t["state"].lower()),
                     *[_cell((t.get("params") or {}).get(p)) for p in params],
                     _metric(t.get("value")), steps, _duration(t.get("wall_s")),
                     _cell(t.get("note") or "")])
    note = "★ marks the best trial. " if best else ""
    return [*_table(header, rows), note + "Wall time is h:mm:ss; params in 4 significant digits.",
            ""]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# ----------------------------------------------------------------------------- figures
# Each figure has draw(ax, summary, trials, best), and missing(summary, trials): the sentence the
# report shows instead when there is nothing to draw, else "".

def _history_missing(summary: dict, trials: list[dict]) -> str:
    pruned = [t for t in trials if t["state"] == "PRUNED" and math.isfinite(_last_value(t))]
    if _complete(trials) or pruned:
        return ""
    return "No optimisation history: no trial has a value yet."


def _draw_history(ax, summary: dict, trials: list[dict], best: Optional[dict]) -> None:
    """Each complete trial's value by trial number, pruned ones where they stopped, best so far."""
    done = _complete(trials)
    x = np.array([t["number"] for t in done], dtype=float)
    y = np.array([_float(t["value"]) for t in done])
    ax.plot(x, y, "o", color=COLORS[0], label="complete")
    pruned = [(t["number"], _last_value(t)) for t in trials if t["state"] == "PRUNED"]
    pruned = [(n, v) for n, v in pruned if math.isfinite(v)]
    if pruned:
        ax.plot(*zip(*pruned), "x", color=COLORS[3], markersize=8, markeredgewidth=2,
                label="pruned (last val eval)")
    if len(done):
        minimize = summary.get("direction") == "minimize"
        running = (np.minimum if minimize else np.maximum).accumulate(y)
        ax.plot(x, running, "-", color=COLORS[1], drawstyle="steps-post", label="best so far")
    if any(t is best for t in done):
        ax.plot(best["number"], _float(best["value"]), "*", color=COLORS[1], markersize=16,
                label=f"best: trial {best['number']}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="trial", ylabel=f"val {summary.get('metric', 'value')}",
           title=f"Objective per trial ({summary.get('direction', 'maximize')})")
    ax.legend(loc="best")


def _importances_missing(summary: dict, trials: list[dict]) -> str:
    if any(math.isfinite(_float(v)) for v in (summary.get("importances") or {}).values()):
        return ""
    done = len(_complete(trials))
    why = ("they need at least 2 complete trials" if done < 2 else
           "the complete trials' parameters do not vary enough to compare")
    return f"No parameter importances: {why} ({done} complete)."


def _draw_importances(ax, summary: dict, trials: list[dict], best: Optional[dict]) -> None:
    """Horizontal bars, the most important parameter on top."""
    items = [(k, _float(v)) for k, v in summary["importances"].items()]
    items = sorted((kv for kv in items if math.isfinite(kv[1])), key=lambda kv: kv[1])
    bars = ax.barh([k for k, _ in items], [v for _, v in items], color=COLORS[0])
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.margins(x=0.15)  # room for the value labels
    ax.grid(axis="y", visible=False)
    ax.set(xlabel="importance", title=f"How much each parameter moved val "
                                      f"{summary.get('metric', 'value')}")


def _curves_missing(summary: dict, trials: list[dict]) -> str:
    if any(np.isfinite(_curve(t)).all(axis=1).any() for t in trials):
        return ""
    return "No val curves: no trial has logged a val eval yet."


def _draw_curves(ax, summary: dict, trials: list[dict], best: Optional[dict]) -> None:
    """Every trial's val metric by step: pruned dashed to an x, failed dotted, the best thick."""
    drawn = [t for t in trials if np.isfinite(_curve(t)).all(axis=1).any()]
    # With many trials the legend names the best ones only: the rest stay visible, unnamed.
    sign = 1 if summary.get("direction") == "minimize" else -1
    score = {t["number"]: _float(t["value"]) if t["state"] == "COMPLETE" else _last_value(t)
             for t in drawn}
    ranked = sorted(drawn, key=lambda t: (t is not best, math.isnan(score[t["number"]]),
                                          sign * np.nan_to_num(score[t["number"]])))
    named = {t["number"] for t in ranked[:LEGEND_TRIALS]}
    styles = {"PRUNED": "--", "FAIL": ":"}
    for t in drawn:
        curve, color = _curve(t), COLORS[t["number"] % len(COLORS)]
        curve = curve[np.isfinite(curve).all(axis=1)]
        ax.plot(curve[:, 0], curve[:, 1], styles.get(t["state"], "-"), marker="o", markersize=3,
                color=color, linewidth=2.8 if t is best else 1.3, alpha=1 if t is best else 0.8,
                zorder=3 if t is best else 2,  # on top of the others
                label=(f"trial {t['number']}" + (" (best)" if t is best else ""))
                if t["number"] in named else None)
        if t["state"] == "PRUNED":
            ax.plot(curve[-1, 0], curve[-1, 1], "x", color=color, markersize=9,
                    markeredgewidth=2)
    handles, labels = ax.get_legend_handles_labels()
    keys = [("PRUNED", Line2D([], [], color="grey", linestyle="--", marker="x"), "pruned here"),
            ("FAIL", Line2D([], [], color="grey", linestyle=":"), "failed")]
    for state, handle, label in keys:
        if any(t["state"] == state for t in drawn):
            handles.append(handle)
            labels.append(label)
    limited = f"{len(named)} best of {len(drawn)} trials" if len(drawn) > len(named) else None
    ax.legend(handles, labels, title=limited, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.xaxis.set_major_formatter("{x:,.0f}")
    ax.set(xlabel=STEP_LABEL, ylabel=f"val {summary.get('metric', 'value')}",
           title="Val metric at each eval")
