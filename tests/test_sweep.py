"""Real sweeps: ``ddp-train sweep`` subprocesses whose trials are real ddp-train runs (torchrun,
gloo, 2 CPU ranks where the issue asks for it; 1 rank where only the sweep's own behaviour is
under test, to keep CI time down).

* the digits demo: 5 trials of 2 ranks, TPE + median pruner; a deliberately bad region
  (lr 1e-6) is pruned with every rank stopping at the same step; report.md, PNGs, best.yaml;
  best.yaml retrains to the trial's metric; plot_training_curve.py overlays the trials;
  optuna-dashboard opens the journal;
* a sweep killed by SIGKILL has its trial failed and retried when run again, no trial number
  run twice (a stopped worker's trial resuming: tests/test_slurm.py);
* PostgreSQL storage (a real server from launch/postgres.sh) with --parallel 2;
* the document-classifier and conveyor sweep files at tiny scale (their spaces' corners).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from conftest import ROOT, torchrun_env
from ddp_train.demo import ensure_digits
from ddp_train.dist import DistInfo
from pgserver import postgres  # noqa: F401  (fixture)

optuna = pytest.importorskip("optuna")
TrialState = optuna.trial.TrialState

QUICK = {"eval.every_steps": 10, "eval.every_epoch": False, "eval.test_at_end": False,
         "data.num_workers": 0, "log.progress": "plain", "train.max_steps": 30}


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "digits")
    ensure_digits(root, DistInfo())
    return root


def sweep_file(tmp_path, shards: str, name: str = "s", **fields) -> str:
    data = {"name": name, "base": "digits", "metric": "acc", "ranks": 1, "trials": 2,
            "overrides": {**QUICK, "data.shards": shards},
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
            "pruner": {"name": "median", "n_startup_trials": 2, "n_warmup_steps": 20},
            "space": {"optim.lr": {"float": [1e-6, 1e-2], "log": True},
                      "optim.weight_decay": {"float": [0.0, 0.1]}}}
    data.update(fields)
    path = str(tmp_path / f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f)
    return path


def sweep(*args: str, cwd, timeout: float = 400, check: bool = True):
    proc = subprocess.run([sys.executable, "-m", "ddp_train", "sweep", *args], cwd=cwd,
                          env=torchrun_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"ddp-train sweep exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-4000:]}")
    return proc


def trials_of(out: str) -> list:
    with open(os.path.join(out, "sweep.json"), encoding="utf-8") as f:
        info = json.load(f)
    from ddp_train.sweep.study import open_storage

    return optuna.load_study(study_name=info["name"],
                             storage=open_storage(info["storage"])).get_trials()


def events(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if "event" in r]


def evals(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "eval.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["split"] == "val"]


def test_digits_sweep_prunes_the_bad_region_and_best_yaml_retrains(tmp_path, digits):
    # 20 steps: the pruner's first look (n_warmup_steps 20) is the trials' last eval.
    path = sweep_file(tmp_path, digits, ranks=2, trials=5,
                      overrides={**QUICK, "data.shards": digits, "train.max_steps": 20},
                      enqueue=[{"optim.lr": 3e-3}, {"optim.lr": 2e-3}, {"optim.lr": 1e-6}])
    out = str(tmp_path / "out")
    proc = sweep(path, "--out", out, cwd=tmp_path)
    trials = trials_of(out)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]
    states = [t.state for t in trials]
    assert states[:3] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED], proc.stdout
    assert all(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
    # The pruned trial: both ranks stopped at step 20, its end record says why.
    bad = os.path.join(out, "trials", "2")
    end = events(bad)[-1]
    assert end["event"] == "end" and end["pruned"] is True and end["step"] == 20
    assert "is below the median" in end["reason"] and "of 2 complete trials" in end["reason"]
    assert "stopped: pruned: best val acc" in open(os.path.join(bad, "train.log")).read()
    assert trials[2].user_attrs["steps"] == 20
    # Complete trials: the value is their best val acc; the trial's own config is in its folder.
    best = max((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    run = os.path.join(out, "trials", str(best.number))
    assert best.value == max(e["acc"] for e in evals(run))
    with open(os.path.join(run, "config.yaml"), encoding="utf-8") as f:
        assert yaml.safe_load(f)["optim"]["lr"] == pytest.approx(best.params["optim.lr"])
    # Report, figures, best.yaml.
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert f"Trial **{best.number}**" in report and "pruned" in report
    for png in ("history.png", "curves.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    best_yaml = os.path.join(out, "best.yaml")
    with open(best_yaml, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    assert cfg["sweep"]["storage"] == "" and cfg["run"]["path"] == ""
    assert f"best trial {best.number}: val acc {best.value:.4g}" in proc.stdout
    # Retrained from best.yaml alone (2 ranks, as the trial ran): the same val accuracy.
    retrain = str(tmp_path / "retrain")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "ddp_train", "--config", best_yaml,
                    f"run.path={retrain}"], cwd=tmp_path, env=torchrun_env(), check=True,
                   capture_output=True, timeout=300)
    assert max(e["acc"] for e in evals(retrain)) == pytest.approx(best.value, abs=1e-9)
    # The trials overlay like runs.
    plot = subprocess.run([sys.executable, os.path.join(ROOT, "plot_training_curve.py"), "--log",
                           *sorted(os.path.join(out, "trials", n) for n in "01234"),
                           "--output", str(tmp_path / "plots")], capture_output=True, text=True,
                          timeout=120)
    assert plot.returncode == 0 and "(5 run(s)" in plot.stdout, plot.stderr
    check_dashboard(os.path.join(out, "study.journal"), "s")


def check_dashboard(storage: str, study: str) -> None:
    """optuna-dashboard serves the sweep's storage: its API lists the study."""
    dashboard = os.path.join(os.path.dirname(sys.executable), "optuna-dashboard")
    if not os.path.exists(dashboard):
        pytest.skip("optuna-dashboard is not installed (the [dashboard] extra)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([dashboard, storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies",
                                            timeout=10) as r:
                    names = [s["study_name"] for s in json.load(r)["study_summaries"]]
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, \
                    proc.stderr.read() if proc.poll() is not None else "no answer in 60 s"
                time.sleep(0.5)
        assert study in names
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _start_and_wait(path: str, out: str, cwd, step: int) -> subprocess.Popen:
    """Start a sweep; return once trial 0 has passed ``step`` (so it has a checkpoint)."""
    proc = subprocess.Popen([sys.executable, "-m", "ddp_train", "sweep", path, "--out", out],
                            cwd=cwd, env=torchrun_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(out, "trials", "0", "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with open(metrics, encoding="utf-8") as f:
                steps = [json.loads(ln).get("step", 0) for ln in f if ln.endswith("\n")]
            if steps and max(steps) >= step:
                return proc
        except FileNotFoundError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.kill()
    pytest.fail("trial 0 did not reach step {step} in 120 s")


def test_killed_sweep_fails_and_retries_its_trial(tmp_path, digits):
    """SIGKILL: the worker dies without a word. Run again with --resume: the trial is seen as
    lost at once (its worker's pid is gone), failed, and its parameters retried under a new
    number; the budget of 1 is still 1 finished trial. (A worker stopped by a signal resumes
    its trial instead: tests/test_slurm.py, the array test.)"""
    overrides = {**QUICK, "data.shards": digits, "checkpoint.every_steps": 5}
    path = sweep_file(tmp_path, digits, name="kill", overrides=overrides, trials=1)
    out = str(tmp_path / "kill")
    proc = _start_and_wait(path, out, tmp_path, step=6)
    proc.kill()
    proc.wait()
    sweep(path, "--out", out, "--resume", cwd=tmp_path)
    lost, retry = trials_of(out)
    assert lost.state == TrialState.FAIL and "is gone" in lost.user_attrs["lost"]
    assert retry.user_attrs["retry_of"] == 0 and retry.params == lost.params
    assert retry.state == TrialState.COMPLETE and sorted(retry.intermediate_values) == \
        [10, 20, 30]
    report = open(os.path.join(out, "report.md"), encoding="utf-8").read()
    assert "retry of trial 0" in report and "lost: its worker" in report


def test_postgresql_storage_with_parallel_workers(tmp_path, digits, postgres):
    url = postgres("ddp_sweep_test")
    path = sweep_file(tmp_path, digits, name="pg", trials=2)
    out = str(tmp_path / "pg")
    proc = sweep(path, "--out", out, "--storage", url, "--parallel", "2", cwd=tmp_path)
    study = optuna.load_study(study_name="pg", storage=url)
    assert [t.number for t in study.trials] == [0, 1]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    workers = {t.user_attrs["worker"]["id"] for t in study.trials}
    assert len(workers) == 2, workers  # both workers took trials
    assert json.load(open(os.path.join(out, "sweep.json")))["storage"] == url
    assert not os.path.exists(os.path.join(out, "study.journal"))
    assert "report" in proc.stdout and os.path.exists(os.path.join(out, "report.md"))


@pytest.mark.parametrize("name", ["convnext_doc", "conveyor_film"])
def test_report_sweeps_run_at_tiny_scale(name, tmp_path, digits):
    """The bundled sweep files of the reports, shrunk by command-line overrides: the lowest and
    the highest corner of each search space train (one process, in this one, CPU). The sweep
    machinery around a trial is the digits test's part."""
    from ddp_train.sweep.spec import load_sweep
    from ddp_train.trainer import train

    shards = digits
    tiny = ["data.image_size=32", "data.num_workers=0", "train.batch_size=8",
            "train.max_steps=4", "eval.every_steps=2", "eval.batch_size=64", "log.progress=none",
            "checkpoint.every_minutes=0", "model.num_classes=0", "engine.precision=fp32"]
    if name == "convnext_doc":
        tiny += ["model.name=convnext_atto"]  # ConvNeXt-Base's smallest sibling, same code
    else:
        from mmgen import CLASSES, make_multimodal_csv
        from ddp_train.shards.pack import pack

        src = make_multimodal_csv(str(tmp_path / "src"), per_class=8)
        shards = str(tmp_path / "mm")
        pack(src, shards, extras=["sensor", "env"], classes=list(CLASSES), workers=1,
             progress="none", val_fraction=0.25, test_fraction=0.25)
    sweep = load_sweep(name, overrides=[f"data.shards={shards}", *tiny])
    assert sweep.metric == "macro_f1" and sweep.cfg.sampler.name == "tpe"
    assert sweep.cfg.pruner.name == "median"
    for corner in (0, -1):
        params = {p.key: p.choices[corner] if p.kind == "choice" else (p.low, p.high)[corner]
                  for p in sweep.space}
        cfg = sweep.trial_config(params, [f"run.path={tmp_path / f'corner{corner}'}"])
        result = train(cfg, DistInfo())
        assert result["step"] == 4 and 0 <= result["val"]["macro_f1"] <= 1, (params, result)
