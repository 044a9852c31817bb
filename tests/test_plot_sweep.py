"""The sweep report (ddp_train.plot.sweep): report.md and its PNGs from plain trial dicts.

The inputs are what the sweep command hands over: a realistic study (complete, pruned and failed
trials, float and categorical params), then the edge cases a live sweep goes through: no trial
yet, none complete yet, a diverged (NaN) trial, a single trial.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

from PIL import Image

from ddp_train.plot.sweep import write_sweep_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("history.png", "importances.png", "curves.png")


def _trial(number, state, value=None, curve=(), note="", **params):
    params = params or {"optim.lr": 0.003, "model.name": "resnet18"}
    done = state in ("COMPLETE", "PRUNED")
    return {"number": number, "state": state, "value": value,
            "params": {k.replace("__", "."): v for k, v in params.items()},
            "steps": 40 if done else None, "wall_s": 3725.4 if done else None,
            "curve": [list(p) for p in curve], "note": note, "run_dir": f"trials/{number}"}


def _summary(best=None, importances=None, **extra):
    return {"name": "digits-lr", "metric": "acc", "direction": "maximize",
            "storage": "sweeps/digits-lr/study.journal", "best": best,
            "importances": importances or {},
            "best_yaml": "sweeps/digits-lr/best.yaml" if best is not None else "",
            "generated": "2024-05-01 12:00:00", **extra}


PRUNED_NOTE = "pruned at step 20: val acc 0.11 below the median 0.87 of 2 trials"
TRIALS = [
    _trial(0, "COMPLETE", 0.8812, [(20, 0.71), (40, 0.8812)], optim__lr=0.001234567,
           model__name="resnet18"),
    _trial(1, "COMPLETE", 0.9345, [(20, 0.85), (40, 0.9345)], optim__lr=0.003,
           model__name="convnext_tiny", optim__weight_decay=0.05),
    _trial(2, "PRUNED", None, [(20, 0.11)], note=PRUNED_NOTE, optim__lr=0.3,
           model__name="resnet18"),
    _trial(3, "FAIL", None, note="CUDA out of memory", optim__lr=0.01, model__name="vit_small"),
    _trial(4, "COMPLETE", 0.9012, [(20, 0.8), (40, 0.9012)], optim__lr=0.0005,
           model__name="resnet18"),
]


def _write(tmp_path, summary, trials):
    path = write_sweep_report(str(tmp_path), summary, trials)
    assert path == os.path.join(str(tmp_path), "report.md")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _table_rows(text):
    """The trial table's data rows, split into cells."""
    table = text.split("## Trials", 1)[1].split("## Figures", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[1:]]


def test_realistic_sweep(tmp_path):
    text = _write(tmp_path, _summary(best=1, importances={"optim.lr": 0.7, "model.name": 0.2,
                                                          "optim.weight_decay": 0.1}), TRIALS)
    assert "# Sweep report: digits-lr" in text
    assert "5 trials: 3 complete, 1 pruned, 1 failed" in text
    assert "sweeps/digits-lr/study.journal" in text
    best = text.split("## Best trial", 1)[1].split("## Trials", 1)[0]
    assert "Trial **1**" in best and "0.9345" in best and "trials/1" in best
    assert "`convnext_tiny`" in best and "ddp-train --config sweeps/digits-lr/best.yaml" in best

    header = text.split("## Trials", 1)[1].split("\n| ", 1)[1].split("\n", 1)[0]
    for column in ("model.name", "optim.lr", "optim.weight_decay", "val acc", "steps", "wall"):
        assert column in header
    rows = _table_rows(text)
    assert [re.sub(r"\D", "", row[0]) for row in rows] == ["0", "1", "2", "3", "4"]
    assert "★" in rows[1][0] and not any("★" in row[0] for row in rows if row is not rows[1])
    by_number = {re.sub(r"\D", "", row[0]): row for row in rows}
    assert "0.001235" in by_number["0"]  # 4 significant digits
    assert "convnext_tiny" in by_number["1"] and "0.05" in by_number["1"]
    assert by_number["0"][4] == ""  # trial 0 has no optim.weight_decay: blank cell
    assert "1:02:05" in by_number["0"]  # 3725 s as h:mm:ss
    assert PRUNED_NOTE in by_number["2"] and "pruned" in by_number["2"]
    assert "failed" in by_number["3"] and "CUDA out of memory" in by_number["3"]

    for name in FIGURES:
        assert f"]({name})" in text
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.size[0] > 0 and image.size[1] > 0
    assert not [n for n in os.listdir(tmp_path) if ".tmp" in n]  # no leftovers of the atomic writes


def test_no_trials(tmp_path):
    text = _write(tmp_path, _summary(), [])
    assert "0 trials" in text and "No trials yet" in text
    assert "no complete trial yet" in text.lower()
    assert not any((tmp_path / name).exists() for name in FIGURES)
    assert "No optimisation history" in text and "No val curves" in text
    assert "at least 2 complete trials" in text


def test_no_complete_trial(tmp_path):
    trials = [TRIALS[2], TRIALS[3], _trial(5, "RUNNING", None, [(20, 0.5)])]
    text = _write(tmp_path, _summary(), trials)
    assert "no complete trial yet" in text.lower() and "ddp-train --config" not in text
    assert "3 trials: 1 pruned, 1 failed, 1 running" in text
    assert len(_table_rows(text)) == 3
    # The pruned trial's last value still gives a history; the curves come from the evals.
    for name in ("history.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / "importances.png").exists() and "No parameter importances" in text


def test_all_failed(tmp_path):
    text = _write(tmp_path, _summary(), [_trial(0, "FAIL", note="boom"), _trial(1, "FAIL")])
    assert "2 trials: 2 failed" in text and "no complete trial yet" in text.lower()
    assert not any((tmp_path / name).exists() for name in FIGURES)


def test_nan_values(tmp_path):
    trials = [_trial(0, "COMPLETE", math.nan, [(20, math.nan), (40, math.nan)]),
              _trial(1, "COMPLETE", 0.5, [(20, 0.4), (40, None), (60, 0.5)]),
              _trial(2, "PRUNED", None, [(20, math.nan)])]
    text = _write(tmp_path, _summary(best=1, importances={"optim.lr": math.nan}), trials)
    assert "NaN" in _table_rows(text)[0]
    assert "Trial **1**" in text
    assert (tmp_path / "history.png").exists() and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "importances.png").exists()


def test_single_trial_and_stale_figure(tmp_path):
    _write(tmp_path, _summary(best=1, importances={"optim.lr": 1.0}), TRIALS)
    assert (tmp_path / "importances.png").exists()
    text = _write(tmp_path, _summary(best=0), [_trial(0, "COMPLETE", 0.9, [(40, 0.9)])])
    assert "1 trial: 1 complete" in text and "Trial **0**" in text
    assert (tmp_path / "history.png").exists() and (tmp_path / "curves.png").exists()
    assert not (tmp_path / "importances.png").exists()  # not left from the first report
    assert "importances.png" not in text


def test_many_trials_legend_limited(tmp_path):
    trials = [_trial(n, "COMPLETE", n / 40, [(10, n / 80), (20, n / 40)], optim__lr=10.0 ** -n)
              for n in range(30)]
    text = _write(tmp_path, _summary(best=29), trials)
    assert len(_table_rows(text)) == 30 and "Trial **29**" in text
    assert (tmp_path / "curves.png").exists()


def test_imports_no_torch():
    code = ("import ddp_train.plot.sweep, ddp_train.plot.cv, sys; "
            "assert 'torch' not in sys.modules and 'optuna' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
