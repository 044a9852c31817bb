"""ddp-plot (docs/plotting.md): figures and report.md from run logs.

The logs are written by the real :class:`ddp_train.runlog.RunLogger` through its event API, in
the order the trainer writes them (resume event, start event, steps, evals, end event; each
event also writes its train.log line), so the parser is tested against the writer's actual
format. A "kill" leaves a torn half line,
as a SIGKILL mid-write does; the next launch's logger starts on a fresh line.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from ddp_train.config import LogConfig
from ddp_train.dist import DistInfo
from ddp_train.plot import figures, logs, stats
from ddp_train.plot.cli import load_runs
from ddp_train.plot.cli import main as plot_main
from ddp_train.plot.report import _plateau_sentences, run_section
from ddp_train.runlog import make_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "plot_training_curve.py")

PER_EPOCH, EPOCHS = 100, 3
TOTAL = PER_EPOCH * EPOCHS
KILL_AT, RESUME_AT = 130, 120  # launch 1 dies after step 130; launch 2 resumes from step 120
NULL_STEP = 250  # a non-finite loss (logged as null), its update skipped
CLASSES = ["cat", "dog", "owl"]
# Val after each epoch (loss, acc, macro-F1): epoch 1 is the best by acc, then val loss rises.
VAL = [(0.60, 0.80, 0.78), (0.40, 0.93, 0.92), (0.50, 0.91, 0.90)]
TEST = (0.45, 0.92, 0.91)
FIGURES = ["loss_raw", "loss_smoothed", "loss_per_epoch", "lr", "loss_reduction",
           "loss_boxplot", "eval_loss", "eval_acc", "eval_macro_f1", "throughput", "step_time",
           "class_f1", "confusion", "overview"]


def base_loss(step: int) -> float:
    return 2.0 * math.exp(-step / 80) + 0.1 + 0.05 * math.sin(step)


def step_record(step: int, loss: float, gpu: bool = False) -> dict:
    """A step record with the trainer's fields (trainer._log_step)."""
    rec = {"step": step, "epoch": (step - 1) // PER_EPOCH, "loss": loss,
           "lr": 1e-3 * min(step / 20, 1.0) * (1 + math.cos(math.pi * step / TOTAL)) / 2,
           "grad_norm": 2.0 * loss, "samples_per_s": 300.0 + step % 7,
           "data_s": 0.01, "step_s": 0.1 + (step % 5) / 100, "elapsed_s": step * 0.1}
    if not math.isfinite(loss):
        rec.update(grad_norm=float("nan"), skipped=True)
    if gpu:
        rec["gpu_mem_gb"] = 3.5
    return rec


def eval_record(split: str, step: int, values: tuple, index: int) -> dict:
    """An eval record as trainer.run_eval logs it (epoch = epochs completed at that point)."""
    loss, acc, f1 = values
    per_class = [{"class": name, "precision": round(acc - 0.01 * i, 4),
                  "recall": round(acc - 0.02 * i, 4), "f1": round(f1 - 0.03 * i + 0.01 * index, 4),
                  "support": 20} for i, name in enumerate(CLASSES)]
    confusion = [[18 - index, 1 + index, 1], [2, 17, 1], [0, 3 - index, 17 + index]]
    return {"split": split, "step": step, "epoch": step // PER_EPOCH, "acc": acc, "macro_f1": f1,
            "per_class": per_class, "confusion_matrix": confusion, "count": 60, "loss": loss}


def new_logger(run_dir: str, resumed_from_step=None):
    """The trainer's logger; a resumed launch's make_logger writes the resume event and line."""
    path = f"{run_dir}/checkpoints/last.pt" if resumed_from_step else ""
    return make_logger(LogConfig(progress="none", interval=10), run_dir, DistInfo(),
                       total_steps=TOTAL, resumed_from_step=resumed_from_step,
                       resumed_from_path=path)


def launch_header(log, run_dir: str, step: int) -> None:
    """What Trainer.fit writes before the first step of a launch: the start event and line."""
    log.event("start", step=step, run_dir=run_dir, world_size=2, model="resnet18", batch_size=16,
              grad_accum=1, updates_per_epoch=PER_EPOCH, total_steps=TOTAL, train_samples=3200,
              classes=CLASSES, shards="shards/animals", engine="ddp", precision="fp32")


def write_run(run_dir: str) -> dict[int, float]:
    """A 300-step run killed after step 130 and resumed from 120; returns step -> final loss."""
    os.makedirs(run_dir)
    final = {}
    log = new_logger(run_dir)
    launch_header(log, run_dir, 0)
    for step in range(1, KILL_AT + 1):
        # The steps the crash rolls back get other values: the rerun's must win.
        loss = base_loss(step) + (5.0 if step > RESUME_AT else 0.0)
        log.log_step(step_record(step, loss))
        final[step] = loss
        if step == PER_EPOCH:
            log.log_eval(eval_record("val", step, VAL[0], 0))
    log.close()
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step":131,"epoch":1,"loss":0.8')  # torn by the kill
    log = new_logger(run_dir, resumed_from_step=RESUME_AT)
    launch_header(log, run_dir, RESUME_AT)
    for step in range(RESUME_AT + 1, TOTAL + 1):
        loss = float("nan") if step == NULL_STEP else base_loss(step)
        log.log_step(step_record(step, loss, gpu=True))  # another key set than launch 1
        if step == NULL_STEP:
            log.event("nonfinite", step=step, streak=1)
        final[step] = loss
        if step % PER_EPOCH == 0:
            epoch = step // PER_EPOCH - 1
            log.log_eval(eval_record("val", step, VAL[epoch], epoch))
    log.log_eval(eval_record("test", TOTAL, TEST, 2))
    log.event("end", step=TOTAL, reason=f"finished {TOTAL} updates")
    log.close()
    return final


def run_cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    """``python plot_training_curve.py ARGS`` in a fresh process, as a user runs it."""
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, SCRIPT, *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def plotted(tmp_path_factory):
    """The restarted run, plotted once with --report by the entry script (-X importtime)."""
    base = tmp_path_factory.mktemp("plot")
    run_dir, out = str(base / "resnet-run"), str(base / "plots")
    final = write_run(run_dir)
    proc = run_cli("--log", os.path.join(run_dir, "metrics.jsonl"), "--output", out, "--report",
                   importtime=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        report = f.read()
    return {"run_dir": run_dir, "out": out, "final": final, "proc": proc, "report": report}


def colored_pixels(path: str, min_variance: float = 100) -> int:
    """Pixels that are clearly not grey: drawn data (lines, boxes, heatmaps), not axes or text.

    Also checks that the image is not flat: grey-level variance above ``min_variance``.
    """
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb[::4, ::4].mean(axis=2).var() > min_variance, path
    return int((rgb.max(axis=2) - rgb.min(axis=2) > 40).sum())


# ----------------------------------------------------------------------------- the entry script

def test_entry_script_does_not_import_torch(plotted):
    modules = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", plotted["proc"].stderr, re.M)
    assert "matplotlib" in {m.strip() for m in modules}  # the import log is really there
    assert not [m for m in modules if m.split(".")[0] == "torch"]
    assert "matplotlib.pyplot" not in modules  # Agg only: no GUI toolkit on a desktop


def test_every_figure_is_written_and_not_blank(plotted):
    out = plotted["out"]
    written = sorted(name for name in os.listdir(out))
    assert written == sorted([f"{name}.png" for name in FIGURES] + ["report.md"])
    for name in FIGURES:
        assert colored_pixels(os.path.join(out, f"{name}.png")) > 500, name  # data was drawn
    assert Image.open(os.path.join(out, "loss_raw.png")).size == (1080, 600)  # 9x5 in at 120 dpi
    overview = Image.open(os.path.join(out, "overview.png")).size
    assert overview == (3 * 1080, 4 * 600)  # 11 panels, 3 per row
    assert report_figures(plotted["report"]) == [f"{name}.png" for name in FIGURES]


def report_figures(report: str) -> list[str]:
    return re.findall(r"^!\[[^\]]*\]\(([^)]+)\)$", report, re.M)


# ----------------------------------------------------------------------------- parsing

def reference_steps(path: str) -> dict[int, dict]:
    """The reader of docs/logs.md: json.loads per line, skip bad lines, later records win."""
    steps = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "event" not in rec:
                steps[rec["step"]] = rec
    return steps


def assert_same_steps(run: logs.Run, reference: dict[int, dict]) -> None:
    assert run.steps["step"].tolist() == sorted(reference)
    for column in ("epoch", "loss", "lr", "samples_per_s", "step_s", "time"):
        expected = [np.nan if reference[s].get(column) is None else reference[s][column]
                    for s in sorted(reference)]
        np.testing.assert_allclose(run.steps[column].to_numpy(float), expected, rtol=1e-12,
                                   err_msg=column)


def test_restart_later_values_win_and_resume_is_marked(plotted):
    path = os.path.join(plotted["run_dir"], "metrics.jsonl")
    run = logs.load_run(path)
    assert_same_steps(run, reference_steps(path))
    final = plotted["final"]
    loss = dict(zip(run.steps["step"], run.steps["loss"]))
    assert [loss[s] for s in range(RESUME_AT + 1, KILL_AT + 1)] == pytest.approx(
        [final[s] for s in range(RESUME_AT + 1, KILL_AT + 1)])  # the rerun's, not +5
    assert math.isnan(loss[NULL_STEP])
    assert run.resumes == [RESUME_AT] and run.replaced == KILL_AT - RESUME_AT
    assert [s["step"] for s in run.starts] == [0, RESUME_AT] and run.end["step"] == TOTAL
    assert [(e["split"], e["step"]) for e in run.evals] == [
        ("val", 100), ("val", 200), ("val", 300), ("test", 300)]
    # The raw-loss figure draws a vertical line at the resume step.
    fig = Figure()
    ax = fig.add_subplot()
    figures.draw_loss_raw(ax, [run], figures.Options())
    verticals = [line for line in ax.lines if line.get_linestyle() == ":"]
    assert [list(line.get_xdata()) for line in verticals] == [[RESUME_AT, RESUME_AT]]
    nonfinite = [line for line in ax.lines if line.get_marker() == "|"]  # red ticks
    assert [list(line.get_xdata()) for line in nonfinite] == [[NULL_STEP]]
    assert "resumed here" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_bulk_parser_matches_line_by_line_reader(tmp_path, monkeypatch):
    """Several pieces, another key set per launch, a garbage line, torn lines, nulls, skips."""
    run_dir = str(tmp_path / "big")
    write_run(run_dir)
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path, "a") as f:
        f.write("not json at all\n")  # garbage mid-file: that piece takes the slow path
        for step in range(TOTAL + 1, TOTAL + 50):
            f.write(json.dumps(step_record(step, base_loss(step)), separators=(",", ":")) + "\n")
        f.write('{"step":350,"epo')  # a live run: torn last line, no newline
    monkeypatch.setattr(logs, "PIECE_BYTES", 4096)  # ~15 lines per piece
    run = logs.load_run(path)
    assert_same_steps(run, reference_steps(path))
    assert run.steps["step"].iloc[-1] == TOTAL + 49
    # The second launch's steps (a null loss, a skipped step) take the fast path, not json.loads.
    with open(path, "rb") as f:
        lines = [line for line in f.read().splitlines(keepends=True) if line.startswith(b'{"step')]
    second = b"".join(line for line in lines if b"gpu_mem_gb" in line)
    assert b'"skipped":true' in second and b'"loss":null' in second
    assert len(logs._parse_steps_bulk(second)) == TOTAL - RESUME_AT
    with pytest.raises(ValueError):  # a line with other keys is caught, not misread
        logs._parse_steps_bulk(second + lines[0])


def test_text_log_input(plotted):
    """train.log: every 10th step as printed (rounded), the resume line, evals from eval.jsonl."""
    run = logs.load_run(os.path.join(plotted["run_dir"], "train.log"))
    steps = list(range(10, TOTAL + 1, 10))
    assert run.steps["step"].tolist() == steps
    expected = [round(plotted["final"][s], 4) for s in steps]  # step 130: the rerun's value
    np.testing.assert_allclose(run.steps["loss"].to_numpy(float), expected, atol=1e-9)
    assert run.resumes == [RESUME_AT] and run.replaced == 1  # step 130 printed twice
    assert [s["model"] for s in run.starts] == ["resnet18", "resnet18"]
    assert run.end["reason"] == f"finished {TOTAL} updates"
    assert len(run.evals) == 4 and run.evals[0]["per_class"]  # eval.jsonl next to it


# ----------------------------------------------------------------------------- long runs

def test_downsampling_keeps_spikes_and_medians_are_exact():
    """What makes a million steps cheap to draw must not change what is drawn."""
    rng = np.random.default_rng(0)
    n = 200_000
    steps, loss = np.arange(1, n + 1), rng.random(n)
    loss[[777, 123_456]] = [50.0, -3.0]  # one-step spikes
    loss[rng.random(n) < 0.01] = np.nan
    x, y = figures.minmax_downsample(steps, loss, 500)
    assert len(x) <= 1000 and np.all(np.diff(x) >= 0)
    assert np.nanmax(y) == 50.0 and np.nanmin(y) == -3.0  # both spikes survive
    assert {778, 123_457} <= set(x.tolist())  # at their own steps
    for window in (2001, 2000, 5):
        at = np.unique(np.linspace(0, n - 1, 1000).round().astype(int))
        expected = stats.rolling_median(pd.Series(loss), window).to_numpy()[at]
        np.testing.assert_allclose(stats.rolling_median_at(loss, window, at), expected)
    # As drawn: a wide window is evaluated at fewer steps, with the exact values there.
    x, y = figures._median_line(steps, pd.Series(loss), 2001, 500)
    assert 100 <= len(x) <= 1000
    full = stats.rolling_median(pd.Series(loss), 2001).to_numpy()
    np.testing.assert_allclose(y, full[x - 1])


# ----------------------------------------------------------------------------- the report

def epoch_means(final: dict[int, float]) -> list[float]:
    return [float(np.nanmean([final[s] for s in range(e * PER_EPOCH + 1, (e + 1) * PER_EPOCH + 1)]))
            for e in range(EPOCHS)]


def test_report_numbers_match_the_log(plotted):
    report, final = plotted["report"], plotted["final"]
    means = epoch_means(final)
    initial = float(np.mean([final[s] for s in range(1, 11)]))
    reduction = [100 * (1 - m / initial) for m in means]
    assert (f"| steps | {TOTAL} of {TOTAL} planned; {TOTAL} logged, epochs 0–2 |") in report
    assert (f"| launches | 2: resumed at step {RESUME_AT}; {KILL_AT - RESUME_AT} repeated step "
            "record(s) replaced by the later ones |") in report
    assert "| batch | 16 per rank × 1 accumulation × 2 rank(s) = 32 per step |" in report
    for epoch in range(EPOCHS):
        label = f"**{epoch} (best)**" if epoch == 1 else str(epoch)  # best val acc: epoch 1
        loss, acc, f1 = VAL[epoch]
        assert (f"| {label} | 100 | {means[epoch]:.4f} |") in report
        assert (f"| {reduction[epoch]:.1f}% | {loss:.4f} | {acc:.4f} | {f1:.4f} | "
                f"{loss - means[epoch]:.4f} |") in report
    assert "| best by acc | val | 200 | 1 | 0.4000 | 0.9300 | 0.9200 |" in report
    assert "| last | val | 300 | 2 | 0.5000 | 0.9100 | 0.9000 |" in report
    assert "| last | test | 300 | 2 | 0.4500 | 0.9200 | 0.9100 |" in report
    assert (f"* Train loss fell {reduction[2]:.1f}% from {initial:.4f} (mean of the 10 logged "
            f"steps 1–10) to {means[2]:.4f} (mean of epoch 2).") in report
    assert "* Best val acc: 0.9300 at epoch 1 (step 200); at the last eval 0.9100." in report
    assert ("* Val accuracy came within 0.5 points of its best (0.9300) only at epoch 1, 1 eval(s) "
            "before the end: too few to call it a plateau.") in report
    assert (f"Over-fitting: val loss rose 25.0% from its minimum 0.4000 (epoch 1) to 0.5000 at "
            f"the last eval (epoch 2) while the train loss fell from {means[1]:.4f} to "
            f"{means[2]:.4f}.") in report
    assert f"* 1 step(s) logged a non-finite loss (null), the first at step {NULL_STEP}." in report
    assert f"* Training ended at step {TOTAL}: finished {TOTAL} updates." in report
    # Per-class table of the best eval (val, step 200, the second eval: index 1).
    best = eval_record("val", 200, VAL[1], 1)["per_class"]
    for c in best:
        assert (f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | "
                f"20 |") in report
    low, high = min(best, key=lambda c: c["f1"]), max(best, key=lambda c: c["f1"])
    assert (f"class {low['class']} has the lowest F1 ({low['f1']:.3f}) and class "
            f"{high['class']} the highest ({high['f1']:.3f})") in report


def test_plateau_sentence():
    acc = [0.5, 0.8, 0.9, 0.902, 0.903, 0.901, 0.904]  # within 0.5 points of the best from epoch 2
    evals = pd.DataFrame({"step": range(10, 80, 10), "epoch": range(7), "acc": acc,
                          "record": range(7)})  # as stats.eval_frame builds it
    assert _plateau_sentences(evals, "val") == [
        "Val accuracy plateaued after epoch 2: the 4 later evals raised its best by at most 0.5 "
        "points (0.9000 → 0.9040)."]
    evals["acc"] = [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]  # still climbing
    assert _plateau_sentences(evals, "val") == [
        "Val accuracy came within 0.5 points of its best (0.9000) only at epoch 6, the last eval: "
        "it was still improving."]


def test_split_option_picks_the_ema_evals(tmp_path):
    """--split val_ema: the best eval, the per-epoch table and the per-class numbers use it."""
    run_dir = str(tmp_path / "ema")
    os.makedirs(run_dir)
    log = new_logger(run_dir)
    launch_header(log, run_dir, 0)
    for step in range(1, 2 * PER_EPOCH + 1):
        log.log_step(step_record(step, base_loss(step)))
        if step % PER_EPOCH == 0:
            i = step // PER_EPOCH - 1
            log.log_eval(eval_record("val", step, VAL[i], i))
            log.log_eval(eval_record("val_ema", step, (0.3, 0.95 - 0.1 * i, 0.94), i))
    log.close()
    run = load_runs([run_dir], "val_ema")[0]
    section = "\n".join(run_section(run, figures.Options()))
    assert "| best by acc | val_ema | 100 | 0 | 0.3000 | 0.9500 | 0.9400 |" in section
    assert "| last | val | 200 | 1 | 0.4000 | 0.9300 | 0.9200 |" in section
    assert "| **0 (best)** |" in section and "val_ema acc" in section
    assert "### Per class, best val_ema eval (step 100)" in section
    with pytest.raises(logs.LogError, match=r"no 'test' evals \(the eval splits logged: val, "
                                            r"val_ema\)"):
        load_runs([run_dir], "test")


def write_launch(run_dir: str, steps: range, event: str, **fields) -> None:
    """One launch over ``steps`` (resumed when they do not start at 1) that ends with the
    ``event`` (``end`` or ``preempted``, with its ``reason``: the ``stopped: ...`` line)."""
    resumed_at = steps[0] - 1
    log = new_logger(run_dir, resumed_from_step=resumed_at or None)
    launch_header(log, run_dir, resumed_at)
    for step in steps:
        log.log_step(step_record(step, base_loss(step)))
    log.event(event, step=steps[-1], **fields)
    log.close()


def test_preempted_last_launch(tmp_path):
    """A finished run trained further and preempted: the report says so, from either log."""
    run_dir = str(tmp_path / "again")
    os.makedirs(run_dir)
    write_launch(run_dir, range(1, 21), "end", reason="finished 20 updates")
    write_launch(run_dir, range(21, 36), "preempted", reason="preempted by SIGTERM",
                 signal="SIGTERM")
    expected = {"metrics.jsonl": "preempted by SIGTERM after step 35: not finished",
                "train.log": "preempted by SIGTERM: not finished"}
    for name, outcome in expected.items():
        run = logs.load_run(os.path.join(run_dir, name))
        assert run.end is None and run.preempted is not None, name
        section = "\n".join(run_section(run, figures.Options()))
        assert f"| end | {outcome}, resume it to continue |" in section, name
        assert f"* The last launch was {outcome}, resume it to continue." in section, name


# ----------------------------------------------------------------------------- several runs

def test_several_runs_overlay_live_run_and_text_log(plotted, tmp_path):
    """metrics.jsonl of one run + train.log of the same run + a live run with a torn last line."""
    live = str(tmp_path / "live-run")
    os.makedirs(live)
    log = new_logger(live)
    launch_header(log, live, 0)
    for step in range(1, 151):
        log.log_step(step_record(step, 0.5 * base_loss(step)))
    log.close()
    with open(os.path.join(live, "metrics.jsonl"), "a") as f:
        f.write('{"step":151,"epoch":1,"loss":0.3,"lr"')  # still being written
    out = str(tmp_path / "plots")
    logs_given = [plotted["run_dir"], os.path.join(plotted["run_dir"], "train.log"), live]
    assert plot_main([arg for path in logs_given for arg in ("--log", path)]
                     + ["--output", out, "--report", "--dpi", "60"]) == 0  # small: faster
    runs = [logs.load_run(path) for path in logs_given]
    assert runs[2].steps["step"].iloc[-1] == 150 and runs[2].end is None
    for name in FIGURES:
        assert colored_pixels(os.path.join(out, f"{name}.png")) > 200, name
    fig = Figure()
    ax = fig.add_subplot()
    runs[1].name += " #2"  # as the CLI names two runs from the same folder
    figures.draw_loss_raw(ax, runs, figures.Options())
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"resnet-run", "resnet-run #2", "live-run"} <= set(labels)
    with open(os.path.join(out, "report.md"), encoding="utf-8") as f:
        report = f.read()
    assert re.findall(r"^## (.+)$", report, re.M) == ["resnet-run", "resnet-run #2", "live-run",
                                                      "Figures"]
    assert "No end record after step 150: the run is still going or was killed." in report


# ----------------------------------------------------------------------------- bad input

def write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "empty", "not_json", "no_steps", "all_null",
                                  "empty_folder"])
def test_bad_input_is_one_line_and_nonzero(tmp_path, case):
    event = '{"event":"start","step":0,"model":"m","time":1.0}\n'
    paths = {
        "missing": lambda: str(tmp_path / "nope" / "metrics.jsonl"),
        "empty": lambda: write(tmp_path / "metrics.jsonl", ""),
        "not_json": lambda: write(tmp_path / "metrics.jsonl", "hello\nthis is not a log\n"),
        "no_steps": lambda: write(tmp_path / "metrics.jsonl", event * 2),
        "all_null": lambda: write(tmp_path / "metrics.jsonl",
                                  '{"step":1,"epoch":0,"loss":null}\n' * 3),
        "empty_folder": lambda: str(tmp_path),
    }
    path = paths[case]()
    proc = run_cli("--log", path, "--output", str(tmp_path / "plots"))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddp-plot: error: "), proc.stderr
    assert path in lines[0] and "Traceback" not in proc.stderr
