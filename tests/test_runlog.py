"""Run folders and loggers: naming, refusal to reuse, append-only flushed JSON lines, consoles."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from ddp_train import runlog
from ddp_train.config import LogConfig, RunConfig
from ddp_train.dist import DistInfo
from ddp_train.runlog import (NullLogger, RunLogger, create_run_dir, latest_run_dir, make_logger,
                              problems_path, write_config)

ONE = DistInfo()


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def new_logger(run_dir, total_steps=100, resumed_from_step=None, **log):
    run_dir.mkdir(exist_ok=True)
    return make_logger(LogConfig(progress=log.pop("progress", "none"), **log), str(run_dir), ONE,
                       total_steps=total_steps, resumed_from_step=resumed_from_step)


def test_new_run_dir_name_and_no_reuse(tmp_path, monkeypatch):
    cfg = RunConfig(name="exp", dir=str(tmp_path))
    monkeypatch.setattr(runlog.time, "strftime", lambda fmt: "20261122-031415")  # same second
    first = create_run_dir(cfg, ONE)
    second = create_run_dir(cfg, ONE)
    assert first == str(tmp_path / "exp-20261122-031415")
    assert second == first + "-2"  # never the same folder twice
    assert os.path.isdir(first) and os.path.isdir(second)


def test_unnamed_run_without_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="run.name is empty"):
        create_run_dir(RunConfig(dir=str(tmp_path)), ONE)  # Config would have named it
    assert os.listdir(tmp_path) == []


def test_new_run_dir_real_clock(tmp_path):
    path = create_run_dir(RunConfig(name="exp", dir=str(tmp_path)), ONE)
    assert re.fullmatch(r"exp-\d{8}-\d{6}", os.path.basename(path))


def test_explicit_path_refused_when_it_holds_a_run(tmp_path):
    path = tmp_path / "mine"
    assert create_run_dir(RunConfig(path=str(path)), ONE) == str(path)  # empty/new: fine
    (path / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="--resume auto"):
        create_run_dir(RunConfig(path=str(path)), ONE)
    assert create_run_dir(RunConfig(path=str(path), resume="auto"), ONE) == str(path)


def test_resume_auto_picks_newest_with_checkpoints(tmp_path):
    for name in ("exp-20260101-000000", "exp-20260301-000000", "exp-20260301-000000-2",
                 "exp-20260401-000000", "exp-other-20270101-000000"):
        (tmp_path / name).mkdir()
    for name in ("exp-20260101-000000", "exp-20260301-000000-2", "exp-other-20270101-000000"):
        (tmp_path / name / "checkpoints").mkdir()
    cfg = RunConfig(name="exp", dir=str(tmp_path), resume="auto")
    # exp-20260401 has no checkpoints; exp-other-* is another run name.
    assert create_run_dir(cfg, ONE) == str(tmp_path / "exp-20260301-000000-2")
    assert latest_run_dir(str(tmp_path / "missing"), "exp") is None
    fresh = create_run_dir(RunConfig(name="new", dir=str(tmp_path), resume="auto"), ONE)
    assert os.path.basename(fresh).startswith("new-")  # nothing to resume: a new run


def test_write_config_keeps_previous_version(tmp_path):
    path = write_config(str(tmp_path), {"b": 1, "a": {"x": [1, 2]}}, ONE)
    assert open(path).read().startswith("b: 1")  # sort_keys=False keeps the given order
    write_config(str(tmp_path), {"b": 1, "a": {"x": [1, 2]}}, ONE)
    assert not (tmp_path / "config-1.yaml").exists()  # unchanged: nothing to keep
    write_config(str(tmp_path), {"b": 2}, ONE)
    assert yaml.safe_load(open(path)) == {"b": 2}
    assert yaml.safe_load(open(tmp_path / "config-1.yaml")) == {"b": 1, "a": {"x": [1, 2]}}
    write_config(str(tmp_path / "other"), {"b": 3}, DistInfo(rank=1, world_size=2))
    assert not (tmp_path / "other").exists()


def test_problems_path(tmp_path):
    assert problems_path(str(tmp_path)) == str(tmp_path / "problematic_samples.jsonl")


def test_step_records_flushed_before_close(tmp_path):
    log = new_logger(tmp_path)
    assert isinstance(log, RunLogger)
    log.log_step({"step": 1, "epoch": 0, "loss": torch.tensor(0.5), "lr": 1e-3,
                  "grad_norm": float("inf"), "samples_per_s": 100.0, "data_s": 0.01,
                  "step_s": 0.2, "elapsed_s": 0.2})
    log.log_step({"step": 2, "loss": float("nan")})
    rows = read_jsonl(tmp_path / "metrics.jsonl")  # read while the logger is still open
    assert rows[0]["loss"] == 0.5 and isinstance(rows[0]["loss"], float)
    assert rows[0]["grad_norm"] is None and rows[1]["loss"] is None  # non-finite -> null
    assert all(isinstance(r["time"], float) for r in rows)
    raw = (tmp_path / "metrics.jsonl").read_text()
    assert ", " not in raw and "NaN" not in raw and "Infinity" not in raw
    log.close()


def test_eval_records_and_summary(tmp_path):
    with new_logger(tmp_path) as log:
        log.log_eval({"split": "val", "step": 10, "epoch": 1, "loss": 0.25, "acc": 0.9,
                      "macro_f1": 0.85, "confusion_matrix": torch.tensor([[3, 1], [0, 4]]),
                      "per_class": [{"class": "a", "f1": 0.8}]})
        (row,) = read_jsonl(tmp_path / "eval.jsonl")
    assert row["confusion_matrix"] == [[3, 1], [0, 4]] and row["per_class"][0]["class"] == "a"
    text = (tmp_path / "train.log").read_text()
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| eval val step 10 \| loss 0.2500 \| "
                     r"acc 0.9000 \| macro_f1 0.8500$", text, re.M)


def test_resume_appends_without_truncation(tmp_path):
    with new_logger(tmp_path) as log:
        log.info("first launch")
        log.log_step({"step": 1, "loss": 1.0})
        log.log_step({"step": 2, "loss": 0.9})
    cfg = LogConfig(progress="none")
    with make_logger(cfg, str(tmp_path), ONE, total_steps=100, resumed_from_step=1,
                     resumed_from_path=str(tmp_path / "checkpoints" / "last.pt")) as log:
        log.log_step({"step": 2, "loss": 0.8})
        log.event("end", step=2, reason="finished 2 updates")
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r.get("event") for r in rows] == [None, None, "resume", None, "end"]
    assert rows[2]["step"] == 1
    assert [r["loss"] for r in rows if "loss" in r] == [1.0, 0.9, 0.8]
    assert "first launch" in (tmp_path / "train.log").read_text()


def test_torn_last_line_is_not_glued_to(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step":1}\n{"step":2,"lo')  # killed mid-write
    with new_logger(tmp_path) as log:
        log.log_step({"step": 2, "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["loss"] == 0.5


def test_null_logger_on_other_ranks_writes_nothing(tmp_path, capsys):
    rank1 = DistInfo(rank=1, world_size=2)
    cfg = LogConfig(progress="plain", interval=1, tensorboard=True)
    with make_logger(cfg, str(tmp_path), rank1, total_steps=10, resumed_from_step=3,
                     resumed_from_path="x.pt") as log:
        assert isinstance(log, NullLogger)
        log.info("hello")
        log.log_step({"step": 4, "loss": 1.0})
        log.log_eval({"split": "val", "step": 4, "acc": 0.5})
        log.warning("disk almost full", event="checkpoint_failed", step=4)
        log.event("end", step=4, reason="finished 4 updates")
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().out == ""


def test_event_and_warning_lines_reach_file_and_console(tmp_path, capsys):
    """event() and warning() write the JSON record and, where the kind has one, the text line."""
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| "
    with new_logger(tmp_path, progress="none") as log:
        log.event("start", step=0, run_dir="runs/x", model="resnet18", world_size=2,
                  batch_size=16, grad_accum=1, updates_per_epoch=50, total_steps=100,
                  classes=["a", "b"])
        log.warning("checkpoint at step 7 not saved, training continues: disk full",
                    event="checkpoint_failed", step=7, error="disk full")
        log.event("nonfinite", step=9, streak=1)  # JSON only
        log.event("end", step=100)  # no reason: no stop line
        log.event("preempted", step=100, reason="preempted by SIGTERM", signal="SIGTERM")
    expected = [r"run runs/x \| resnet18 \| 2 rank\(s\) x batch 16 x accum 1 \| 50 updates/epoch "
                r"\| 100 updates",
                r"WARNING: checkpoint at step 7 not saved, training continues: disk full",
                r"stopped: preempted by SIGTERM"]
    for output in ((tmp_path / "train.log").read_text(), capsys.readouterr().out):
        lines = output.splitlines()
        assert len(lines) == len(expected), output
        for line, pattern in zip(lines, expected):
            assert re.fullmatch(stamp + pattern, line), line
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in rows] == ["start", "checkpoint_failed", "nonfinite", "end",
                                          "preempted"]
    assert rows[0]["classes"] == ["a", "b"] and rows[0]["run_dir"] == "runs/x"
    assert rows[1]["message"].endswith("disk full") and rows[1]["error"] == "disk full"
    assert rows[1]["step"] == 7 and rows[4]["signal"] == "SIGTERM"


def test_plain_console_lines_at_interval(tmp_path, capsys):
    with new_logger(tmp_path, total_steps=25, progress="plain", interval=10) as log:
        for step in range(1, 26):
            log.log_step({"step": step, "epoch": 1, "loss": 0.4312, "lr": 1e-3,
                          "samples_per_s": 512.0})
    lines = capsys.readouterr().out.splitlines()
    assert [re.search(r"step (\d+)/25", line).group(1) for line in lines] == ["10", "20", "25"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| step 10/25 \| epoch 1 \| loss 0.4312 "
                        r"\| lr 1.00e-03 \| 512 img/s \| eta \d+:\d\d:\d\d", lines[0])
    assert (tmp_path / "train.log").read_text().count("step ") == 3


def test_none_and_rich_consoles(tmp_path, capsys):
    with new_logger(tmp_path / "none", progress="none", interval=1) as log:
        log.log_step({"step": 1, "loss": 1.0})
    assert capsys.readouterr().out == ""
    assert "step 1/100" in (tmp_path / "none" / "train.log").read_text()  # the file still has it
    # Forced rich on a non-terminal (pytest captures stdout): must not crash, and info() still
    # reaches the console.
    with new_logger(tmp_path / "rich", total_steps=3, progress="rich") as log:
        for step in range(1, 4):
            log.log_step({"step": step, "loss": float("nan"), "lr": 1e-3})
        log.info("done [not markup]")
    assert "done [not markup]" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "rich" / "metrics.jsonl")) == 3


def test_progress_auto_follows_isatty(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdout.isatty", lambda: True)
    with new_logger(tmp_path / "a", progress="auto") as log:
        assert log.mode == "rich"
    monkeypatch.setattr("sys.stdout.isatty", lambda: False)
    with new_logger(tmp_path / "b", progress="auto") as log:
        assert log.mode == "plain"


def test_tensorboard_sink_writes_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with new_logger(tmp_path, tensorboard=True) as log:
        log.log_step({"step": 1, "loss": 0.5, "lr": 1e-3})
        log.log_eval({"split": "val", "step": 1, "acc": 0.75, "per_class": []})
    (tb,) = [p for p in (tmp_path / "tb").iterdir() if p.name.startswith("events.out.tfevents")]
    events = EventAccumulator(str(tb)).Reload()
    assert {"train/loss", "train/lr", "val/acc"} <= set(events.Tags()["scalars"])
    assert events.Scalars("val/acc")[0].value == pytest.approx(0.75)


def _run_dir_on_rank(rank, init_file, parent, out_dir):
    """One of two gloo ranks: create a run folder, then try to reuse it without --resume."""
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        dist = DistInfo(rank=rank, world_size=2, backend="gloo")
        path = create_run_dir(RunConfig(name="exp", dir=parent), dist)
        if rank == 0:
            (Path(path) / "train.log").write_text("")
        tdist.barrier()
        try:
            create_run_dir(RunConfig(path=path), dist)
            error = ""
        except ValueError as e:  # rank 0's refusal must reach rank 1 instead of hanging it
            error = str(e)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps([path, error]))
    finally:
        tdist.destroy_process_group()


def test_run_dir_agreed_and_refused_on_all_ranks(tmp_path):
    parent = tmp_path / "runs"
    # spawn, not fork: a forked child can hang in the OpenMP pool that earlier tests started.
    torch.multiprocessing.spawn(_run_dir_on_rank,
                                args=(str(tmp_path / "init"), str(parent), str(tmp_path)), nprocs=2)
    (path0, error0), (path1, error1) = (json.loads((tmp_path / f"rank{r}.json").read_text())
                                        for r in (0, 1))
    assert path0 == path1 and os.listdir(parent) == [os.path.basename(path0)]
    assert "--resume auto" in error0 and error0 == error1


def test_wandb_sink_offline_in_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "exp-20261122-031415"
    for resumed_from_step in (None, 1):  # a resume continues the same offline run id
        with new_logger(run_dir, wandb=True, resumed_from_step=resumed_from_step) as log:
            log.log_step({"step": 1, "loss": 0.5})
            log.log_eval({"split": "val", "step": 1, "acc": 0.75})
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith("-exp-20261122-031415") for name in runs)
