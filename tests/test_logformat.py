"""ddp_train.logformat: the one home of the log format, and the writer/reader round trip.

Two kinds of test. The literal lines below are what earlier versions wrote: rendering must still
produce them and parsing must still read them, so a reworded line fails here even though the
writer and the reader (which share logformat) would still agree with each other. Then every
kind of line the trainer writes goes through the real RunLogger into a run folder and is read
back by the plot reader from both metrics.jsonl and train.log.
"""
from __future__ import annotations

import inspect
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ddp_train import logformat as fmt
from ddp_train.config import LogConfig
from ddp_train.dist import DistInfo
from ddp_train.plot.logs import load_run
from ddp_train.runlog import Logger, NullLogger, RunLogger, make_logger

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = "2026-11-22 03:14:15"

# Lines as earlier versions wrote them (docs/logs.md); logs already on disk read like this.
STEP = "step 120/1000 | epoch 1 | loss 0.4312 | lr 1.00e-03 | 512 img/s | eta 0:03:10"
EVAL = "eval val step 40 | loss 0.2500 | acc 0.9000 | macro_f1 0.8500"
START = ("run runs/digits-20261122-031400 | resnet18 | 4 rank(s) x batch 64 x accum 2 | "
         "150 updates/epoch | 1500 updates")
RESUME = "resumed from runs/x/checkpoints/last.pt at step 120"
END = "stopped: finished 1500 updates"
PREEMPTED = "stopped: preempted by SIGTERM"
WARNING = "WARNING: checkpoint at step 7 not saved, training continues: [Errno 28] No space left"


# ----------------------------------------------------------------------------- line by line

def test_render_writes_the_earlier_text():
    record = {"step": 120, "epoch": 1, "loss": 0.43117, "lr": 1e-3, "samples_per_s": 511.6}
    assert fmt.render_step(record, 1000, "0:03:10") == STEP
    assert fmt.render_eval({"split": "val", "step": 40, "epoch": 1, "loss": 0.25, "acc": 0.9,
                            "macro_f1": 0.85, "per_class": []}) == EVAL
    assert fmt.render_start({"run_dir": "runs/digits-20261122-031400", "model": "resnet18",
                             "world_size": 4, "batch_size": 64, "grad_accum": 2,
                             "updates_per_epoch": 150, "total_steps": 1500}) == START
    assert fmt.render_resume("runs/x/checkpoints/last.pt", 120) == RESUME
    assert fmt.render_stop("end", "finished 1500 updates") == END
    assert fmt.render_stop("preempted", "preempted by SIGTERM") == PREEMPTED
    assert fmt.render_warning(WARNING[len("WARNING: "):]) == WARNING


def test_parse_reads_the_earlier_text():
    parsed = {line: fmt.parse_line(f"{STAMP} | {line}") for line in
              (STEP, EVAL, START, RESUME, END, PREEMPTED, WARNING, "calibration on val: T 1.2")}
    assert all(when == STAMP for _, when, _ in parsed.values())
    kinds = {line: kind for line, (kind, _, _) in parsed.items()}
    assert list(kinds.values()) == ["step", "eval", "start", "resume", "stop", "stop", "warning",
                                    "message"]
    fields = {line: f for line, (_, _, f) in parsed.items()}
    assert fields[STEP] == {"step": 120, "total": 1000, "epoch": 1.0, "loss": 0.4312,
                            "lr": 1e-3, "samples_per_s": 512.0}
    assert fields[EVAL] == {"split": "val", "step": 40, "loss": 0.25, "acc": 0.9,
                            "macro_f1": 0.85}
    assert fields[START] == {"run_dir": "runs/digits-20261122-031400", "model": "resnet18",
                             "world_size": 4, "batch_size": 64, "grad_accum": 2,
                             "updates_per_epoch": 150, "total_steps": 1500}
    assert fields[RESUME] == {"path": "runs/x/checkpoints/last.pt", "step": 120}
    assert fields[END] == {"event": "end", "reason": "finished 1500 updates"}
    assert fields[PREEMPTED] == {"event": "preempted", "reason": "preempted by SIGTERM"}
    assert fields[WARNING] == {"message": WARNING[len("WARNING: "):]}
    assert fmt.parse_line(STEP) is None  # no stamp: Slurm noise, not a log line
    assert fmt.parse_line(f"{STAMP} | step 5 | loss 1.0")[0] == "message"  # not a step line


@pytest.mark.parametrize("record", [
    {"step": 7, "epoch": 0, "loss": 2.302585, "lr": 3.456e-5, "samples_per_s": 1234.4},
    {"step": 8, "loss": float("nan")},  # a diverged step; the other fields absent
    {"step": 9},
])
def test_step_line_round_trip(record):
    fields = fmt.parse_step(fmt.render_step(record, 50, "?"))
    assert fields.pop("step") == record["step"] and fields.pop("total") == 50
    assert fields.keys() == record.keys() - {"step"}
    rounded = {"epoch": "{}", "loss": "{:.4f}", "lr": "{:.2e}", "samples_per_s": "{:.0f}"}
    for key, value in fields.items():
        expected = float(rounded[key].format(record[key]))  # the line's precision
        assert value == expected or (math.isnan(value) and math.isnan(expected)), key


def test_eval_line_round_trip():
    record = {"split": "test_ema", "step": 300, "loss": 1.234567, "acc": float("nan"),
              "macro_f1": 0.5, "count": 60, "per_class": [{"class": "a"}]}
    fields = fmt.parse_eval(fmt.render_eval(record))
    assert fields["split"] == "test_ema" and fields["step"] == 300
    assert fields["loss"] == 1.2346 and fields["macro_f1"] == 0.5 and math.isnan(fields["acc"])
    assert set(fields) == {"split", "step", "loss", "acc", "macro_f1"}
    assert fmt.parse_eval(fmt.render_eval({"split": "val", "step": 3})) == {"split": "val",
                                                                             "step": 3}


def test_start_resume_stop_warning_round_trip():
    start = {"run_dir": "runs/my run | v2", "model": "vit_small_patch16_224", "world_size": 16,
             "batch_size": 128, "grad_accum": 4, "updates_per_epoch": 2502, "total_steps": 75060}
    assert fmt.parse_start(fmt.render_start(start)) == start  # " | " in the folder name too
    path = "runs/at step 5/checkpoints/step_00000120.pt"  # " at step " inside the path
    assert fmt.parse_resume(fmt.render_resume(path, 120)) == {"path": path, "step": 120}
    for event, reason, read_as in [("end", "diverged: 20 non-finite steps in a row", "end"),
                                   ("preempted", "preempted by SIGUSR1", "preempted"),
                                   ("preempted", "SIGTERM", "preempted")]:
        assert fmt.parse_stop(fmt.render_stop(event, reason))["event"] == read_as
    assert fmt.parse_stop(fmt.render_stop("preempted", "SIGTERM"))["reason"] == \
        "preempted: SIGTERM"  # prefixed so that the reader cannot take it for an end
    message = "resume=auto: skipping last.pt (truncated): | not a separator"
    assert fmt.parse_warning(fmt.render_warning(message)) == {"message": message}


def test_event_lines_only_for_kinds_with_a_line():
    start = dict(zip(fmt.START_LINE_FIELDS, ["runs/x", "m", 1, 2, 3, 4, 5]))
    assert fmt.event_line("start", {**start, "classes": ["a"]}) == fmt.render_start(start)
    assert fmt.event_line("start", {k: v for k, v in start.items() if k != "run_dir"}) is None
    assert fmt.event_line("resume", {"step": 3, "path": "a.pt"}) == "resumed from a.pt at step 3"
    assert fmt.event_line("resume", {"step": 3}) is None
    assert fmt.event_line("end", {"step": 3, "reason": "done"}) == "stopped: done"
    assert fmt.event_line("end", {"step": 3}) is None
    for name in ("nonfinite", "calibration", "checkpoint_failed", "warning", "config_changed"):
        assert name in fmt.EVENTS and fmt.event_line(name, {"step": 1, "reason": "x"}) is None


def test_json_encoding_and_tolerant_decoding():
    class Tensorish:  # a torch tensor as plain() sees it
        def tolist(self):
            return [[1, 2], [3, 4]]

    record = fmt.plain({"loss": np.float32(0.5), "cm": Tensorish(), "t": (1, float("inf")),
                        1: {"x": float("nan")}})
    line = fmt.dumps(record)
    assert line == '{"loss":0.5,"cm":[[1,2],[3,4]],"t":[1,null],"1":{"x":null}}'
    assert fmt.loads(line) == {"loss": 0.5, "cm": [[1, 2], [3, 4]], "t": [1, None],
                               "1": {"x": None}}
    assert fmt.loads(b'{"step":1,"lo') is None and fmt.loads(b"\xff\xfe") is None
    assert fmt.EVENT_MARK in fmt.dumps({fmt.EVENT_KEY: "start"}).encode()


def test_warning_message():
    assert fmt.warning_message({"event": "warning", "message": "m"}) == "m"
    assert fmt.warning_message({"event": "config_changed", "message": "c", "step": 3}) == "c"
    # Earlier versions' checkpoint_failed had no message: rebuilt as their WARNING line read.
    legacy = {"event": "checkpoint_failed", "step": 7, "error": "[Errno 28] No space left"}
    assert fmt.render_warning(fmt.warning_message(legacy)) == WARNING
    assert fmt.warning_message({"event": "nonfinite", "step": 3, "streak": 1}) is None


def test_logformat_imports_only_the_standard_library():
    code = ("import sys, ddp_train.logformat; print(sorted({m.split('.')[0] for m in sys.modules}"
            " & {'torch', 'numpy', 'pandas', 'yaml', 'rich'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), check=True).stdout
    assert out.strip() == "[]"


def test_every_logger_has_the_same_api():
    for name in ("info", "log_step", "log_eval", "event", "warning", "close"):
        signature = inspect.signature(getattr(Logger, name))
        assert inspect.signature(getattr(RunLogger, name)) == signature, name
        assert getattr(NullLogger, name) is getattr(Logger, name), name  # does nothing
    assert "resumed_from_path" in inspect.signature(make_logger).parameters


# ----------------------------------------------------------------------------- through the logger

TOTAL, INTERVAL, KILL_AT, RESUME_AT, NONFINITE_AT = 40, 5, 25, 20, 15
START_FIELDS = {"world_size": 2, "model": "resnet18", "batch_size": 16, "grad_accum": 2,
                "updates_per_epoch": 10, "total_steps": TOTAL}


def new_logger(run_dir: str, resumed_from_step=None, resumed_from_path=""):
    return make_logger(LogConfig(progress="none", interval=INTERVAL), run_dir,
                       DistInfo(rank=0, world_size=1), total_steps=TOTAL,
                       resumed_from_step=resumed_from_step, resumed_from_path=resumed_from_path)


def step_record(step: int, launch: int) -> dict:
    loss = float("nan") if step == NONFINITE_AT else 1.0 / step + 0.123456789 * launch
    return {"step": step, "epoch": (step - 1) // 10, "loss": loss, "lr": 1e-3 / step,
            "grad_norm": 1.5, "samples_per_s": 100.0 + step / 3, "data_s": 0.01, "step_s": 0.3}


def eval_record(split: str, step: int) -> dict:
    return {"split": split, "step": step, "epoch": step // 10, "loss": 0.5 + 1 / step,
            "acc": 0.7 + step / 1000, "macro_f1": 0.6 + step / 999, "count": 60,
            "per_class": [{"class": "a", "f1": 0.5}], "confusion_matrix": [[1, 0], [0, 1]]}


CKPT_MESSAGE = f"checkpoint at step {RESUME_AT} not saved, training continues: disk full"


def write_restarted_run(run_dir: str) -> dict:
    """Launch 1: steps 1-25, killed; launch 2 resumes from step 20 and finishes. Returns the
    step records that must win and the warnings in order."""
    os.makedirs(run_dir)
    final = {}
    log = new_logger(run_dir)
    log.event("start", step=0, run_dir=run_dir, **START_FIELDS, classes=["a", "b"])
    for step in range(1, KILL_AT + 1):
        final[step] = step_record(step, launch=1)
        log.log_step(final[step])
        if step == NONFINITE_AT:
            log.event("nonfinite", step=step, streak=1)
        if step == RESUME_AT:
            log.log_eval(eval_record("val", step))
            log.warning(CKPT_MESSAGE, event="checkpoint_failed", step=step, error="disk full")
    log.close()
    with open(os.path.join(run_dir, fmt.METRICS), "a") as f:
        f.write('{"step":26,"epoch":2,"lo')  # torn by the kill
    path = os.path.join(run_dir, "checkpoints", "step_00000020.pt")
    log = new_logger(run_dir, resumed_from_step=RESUME_AT, resumed_from_path=path)
    skip = "resume=auto: skipping runs/x/checkpoints/last.pt (truncated)"
    log.warning(skip)
    changed = "config changed since step_00000020.pt: optim.lr 0.001 -> 0.0005"
    log.warning(changed, event="config_changed", step=RESUME_AT,
                changes={"optim.lr": [0.001, 0.0005]})
    log.event("start", step=RESUME_AT, run_dir=run_dir, **START_FIELDS, classes=["a", "b"])
    for step in range(RESUME_AT + 1, TOTAL + 1):
        final[step] = step_record(step, launch=2)
        log.log_step(final[step])
    for split in ("val", "test"):
        log.log_eval(eval_record(split, TOTAL))
    log.event("end", step=TOTAL, reason=f"finished {TOTAL} updates")
    log.close()
    return {"final": final, "warnings": [CKPT_MESSAGE, skip, changed],
            "warning_events": ["checkpoint_failed", "warning", "config_changed"]}


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("logformat") / "rt-run")
    written = write_restarted_run(run_dir)
    # The same train.log alone: without an eval.jsonl beside it, its eval lines are read.
    text_only = os.path.join(os.path.dirname(run_dir), "text-only")
    os.makedirs(text_only)
    shutil.copy(os.path.join(run_dir, fmt.TRAIN_LOG), text_only)
    return {"run_dir": run_dir, "text_only": text_only, **written}


def test_round_trip_from_metrics_jsonl(restarted):
    run = load_run(os.path.join(restarted["run_dir"], fmt.METRICS))
    final = restarted["final"]
    assert run.steps["step"].tolist() == list(range(1, TOTAL + 1))
    for column in ("epoch", "loss", "lr", "samples_per_s", "step_s"):
        np.testing.assert_array_equal(run.steps[column].to_numpy(float),
                                      [final[s][column] for s in range(1, TOTAL + 1)], column)
    assert run.replaced == KILL_AT - RESUME_AT and run.resumes == [RESUME_AT]
    assert [s["step"] for s in run.starts] == [0, RESUME_AT]
    assert all({**START_FIELDS, "classes": ["a", "b"]}.items() <= s.items() for s in run.starts)
    assert run.end["reason"] == f"finished {TOTAL} updates" and run.end["step"] == TOTAL
    assert run.preempted is None
    assert [w["message"] for w in run.warnings] == restarted["warnings"]
    assert [w["event"] for w in run.warnings] == restarted["warning_events"]
    assert run.warnings[0]["error"] == "disk full" and run.warnings[0]["step"] == RESUME_AT
    assert run.warnings[2]["changes"] == {"optim.lr": [0.001, 0.0005]}
    expected = [eval_record(split, step) for split, step in
                [("val", RESUME_AT), ("val", TOTAL), ("test", TOTAL)]]
    assert [{k: e[k] for k in expected[0]} for e in run.evals] == expected


def test_round_trip_from_train_log(restarted):
    final = restarted["final"]
    printed = list(range(INTERVAL, TOTAL + 1, INTERVAL))
    for folder in (restarted["run_dir"], restarted["text_only"]):
        run = load_run(os.path.join(folder, fmt.TRAIN_LOG))
        assert run.steps["step"].tolist() == printed, folder
        for column, precision in (("loss", "{:.4f}"), ("lr", "{:.2e}"),
                                  ("samples_per_s", "{:.0f}"), ("epoch", "{}")):
            expected = [float(precision.format(final[s][column])) for s in printed]
            np.testing.assert_array_equal(run.steps[column].to_numpy(float), expected, column)
        assert math.isnan(run.steps["loss"][run.steps["step"] == NONFINITE_AT].item())
        assert run.replaced == 1 and run.resumes == [RESUME_AT]  # step 25 printed twice
        assert run.starts == [{"run_dir": restarted["run_dir"], **START_FIELDS}] * 2
        assert run.end == {"event": "end", "reason": f"finished {TOTAL} updates"}
        assert run.preempted is None and run.text_wall_s is not None
        assert [w["message"] for w in run.warnings] == restarted["warnings"]
    # Evals from the summary lines, at their 4 decimals (no per-class numbers in the text).
    assert [(e["split"], e["step"]) for e in run.evals] == [("val", RESUME_AT), ("val", TOTAL),
                                                            ("test", TOTAL)]
    for parsed in run.evals:
        record = eval_record(parsed["split"], parsed["step"])
        for key in fmt.EVAL_SUMMARY_FIELDS:
            assert parsed[key] == float(f"{record[key]:.4f}"), key
        assert "per_class" not in parsed


def test_preempted_after_an_end_from_both_logs(tmp_path):
    run_dir = str(tmp_path / "preempted-run")
    os.makedirs(run_dir)
    with new_logger(run_dir) as log:
        log.event("start", step=0, run_dir=run_dir, **START_FIELDS)
        for step in range(1, 11):
            log.log_step(step_record(step, launch=1))
        log.event("end", step=10, reason="finished 10 updates")
    with new_logger(run_dir, resumed_from_step=10, resumed_from_path="last.pt") as log:
        log.event("start", step=10, run_dir=run_dir, **START_FIELDS)
        for step in range(11, 18):
            log.log_step(step_record(step, launch=2))
        log.event("preempted", step=17, signal="SIGUSR1", reason="preempted by SIGUSR1")
    for name in (fmt.METRICS, fmt.TRAIN_LOG):
        run = load_run(os.path.join(run_dir, name))
        assert run.end is None, name  # the later launch's preemption is the run's state
        assert run.preempted["reason"] == "preempted by SIGUSR1", name
        assert run.resumes == [10] and run.warnings == [], name
    assert run.steps["step"].tolist() == [5, 10, 15]  # every log.interval-th step
    assert load_run(os.path.join(run_dir, fmt.METRICS)).preempted["signal"] == "SIGUSR1"
