"""What a sweep found: the study as plain rows, best.yaml, and report.md with its figures.

The rows are plain data so the plotting package (:mod:`ddp_train.plot.sweep`) draws the report
without Optuna or torch.
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Optional

import optuna
from optuna.trial import TrialState

from .study import LOST, PRUNED, RETRY_OF, STEPS, SweepStudy, display_url
from .worker import best_config, trial_dir

BEST_YAML = "best.yaml"


def trial_rows(study: SweepStudy) -> list[dict]:
    """Every trial as {number, state, params, value, steps, wall_s, curve, note, run_dir}."""
    rows = []
    for t in study.trials():
        attrs = t.user_attrs
        note = attrs.get(PRUNED) or attrs.get("error") or attrs.get(LOST) or ""
        if attrs.get(LOST):
            note = f"lost: {note}; retried"
        if RETRY_OF in attrs:
            note = f"retry of trial {attrs[RETRY_OF]}" + (f"; {note}" if note else "")
        curve = sorted(t.intermediate_values.items())
        wall = None
        if t.datetime_start and t.datetime_complete:
            wall = (t.datetime_complete - t.datetime_start).total_seconds()
        rows.append({"number": t.number, "state": t.state.name, "params": dict(t.params),
                     "value": t.value,
                     "steps": attrs.get(STEPS, curve[-1][0] if curve else None), "wall_s": wall,
                     "curve": [[s, v] for s, v in curve], "note": note,
                     "run_dir": os.path.relpath(trial_dir(study.folder, t.number),
                                                study.folder)})
    return rows


def best_number(study: SweepStudy) -> Optional[int]:
    """The best complete trial's number (None before one completes)."""
    try:
        return study.study.best_trial.number
    except ValueError:  # Optuna: no complete trial yet
        return None


def importances(study: SweepStudy) -> dict:
    """Optuna's parameter importances (PED-ANOVA by default), {} until they can be computed."""
    if len(study.trials(TrialState.COMPLETE)) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature warnings
            return {k: float(v) for k, v in
                    optuna.importance.get_param_importances(study.study).items()}
    except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. every trial the same value
        return {}


def write_results(study: SweepStudy) -> dict:
    """Write best.yaml (when a trial completed) and report.md + PNGs; returns the summary."""
    folder = study.folder
    best = best_number(study)
    best_yaml = ""
    if best is not None:
        best_yaml = os.path.join(folder, BEST_YAML)
        tmp = f"{best_yaml}.tmp.{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(f"# The resolved config of trial {best} of sweep {study.sweep.name} (best val "
                    f"{study.sweep.metric}).\n# Retrain: ddp-train --config {best_yaml}\n")
            f.write(best_config(folder, best))
        os.replace(tmp, best_yaml)
    from ..plot.sweep import write_sweep_report  # matplotlib only when a report is written

    rows = trial_rows(study)
    summary = {"name": study.sweep.name, "metric": study.sweep.metric,
               "direction": study.sweep.direction, "storage": display_url(study.storage_url),
               "best": best, "importances": importances(study), "best_yaml": best_yaml,
               "generated": time.strftime("%Y-%m-%d %H:%M:%S")}
    summary["report"] = write_sweep_report(folder, summary, rows)
    summary["trials"] = rows
    return summary
