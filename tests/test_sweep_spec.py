"""The sweep file's checks (one line, exit 2, before any trial) and the study's bookkeeping
(seeded sampling, budget, resume of a preempted trial, heartbeat) on real Optuna journal files.

No training runs here: trials are asked and told by hand. tests/test_sweep.py runs real ones.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT
from ddp_train.config import ConfigError
from ddp_train.sweep import cli
from ddp_train.sweep.spec import load_sweep, parse_param
from ddp_train.sweep.study import (HEARTBEAT, LOST, PREEMPTED, RETRY_OF, WORKER, SweepStudy,
                                   worker_identity)

optuna = pytest.importorskip("optuna")
TrialState = optuna.trial.TrialState

GOOD = {"base": "digits", "metric": "acc", "trials": 6,
        "sampler": {"name": "tpe", "seed": 3, "n_startup_trials": 2},
        "pruner": {"name": "median", "n_startup_trials": 1},
        "space": {"optim.lr": {"float": [1e-4, 1e-1], "log": True},
                  "train.batch_size": {"int": [16, 64], "step": 16},
                  "model.name": {"choice": ["resnet10t", "resnet18"]}}}


def write(tmp_path, data: dict, name: str = "s.yaml") -> str:
    path = str(tmp_path / name)
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f)
    return path


def with_(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def space(**entries) -> dict:
    return with_(space=entries)


BAD = [
    (with_(sampler={"name": "cmaes"}), "sampler.name: 'cmaes' is not one of tpe, random, grid"),
    (with_(trails=3), "trails: unknown key (did you mean 'trials'?)"),
    (space(**{"optim.lrr": {"float": [1e-4, 1e-2]}}),
     "space.optim.lrr: not a ddp-train config key (did you mean 'optim.lr'?)"),
    (space(**{"train.batch_size": {"float": [16, 64]}}),
     "space.train.batch_size: is int-valued: a float range does not fit it (use int: [lo, hi])"),
    (space(**{"optim.lr": {"float": [-1.0, 1e-2]}}), "space.optim.lr: -1.0 is refused: optim.lr"),
    (space(**{"engine.precision": {"choice": ["fp32", "fp8"]}}),
     "space.engine.precision: 'fp8' is refused: engine.precision: 'fp8' is not one of"),
    (space(**{"optim.lr": {"float": [0.0, 1e-2], "log": True}}),
     "space.optim.lr: log: needs low > 0, got 0.0"),
    (space(**{"optim.lr": {"float": [1e-2, 1e-4]}}), "space.optim.lr: low 0.01 must be below"),
    (space(**{"optim.lr": {"float": [1e-4, 1e-2], "lg": True}}),
     "space.optim.lr: unknown option 'lg' for a float range"),
    (space(**{"optim.lr": [1e-4, 1e-2]}), "space.optim.lr: expected {float|int|choice: ...}"),
    (space(**{"run.path": {"choice": ["a", "b"]}}), "space.run.path: is set by the sweep"),
    (with_(space={}), "space: is empty"),
    (with_(sampler={"name": "grid"}),
     "space.optim.lr: the grid sampler needs choices or an int range"),
    (with_(trials=0), "trials: 0 needs timeout_min (or the grid sampler)"),
    (with_(enqueue=[{"optim.momentum": 0.5}]), "enqueue[0]: 'optim.momentum' is not a space key"),
    (with_(enqueue=[{"optim.lr": -3}]), "enqueue[0]: optim.lr"),
    (with_(overrides={"run.resume": "auto"}), "overrides.run.resume: is set by the sweep"),
    (with_(overrides={"train.epohcs": 2}), "base/overrides: train.epohcs: unknown key"),
    (with_(metric="f1"), "metric: 'f1' is not one of acc, macro_f1, loss"),
    (with_(heartbeat_s=60, grace_s=90), "grace_s: must be at least twice heartbeat_s"),
    (with_(base="no/such/config.yaml"), "base/overrides: no/such/config.yaml: cannot read"),
]


@pytest.mark.parametrize("data,message", BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_sweep_file_is_one_line_naming_key_and_file(tmp_path, capsys, data, message):
    path = write(tmp_path, data)
    assert cli.main([path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("ddp-train sweep: error: ") and message in err, err
    assert err.rstrip().endswith(f"[in {path}]"), err
    assert not os.path.exists(tmp_path / "out")  # nothing was created


def test_missing_file_and_cli_override_errors(tmp_path, capsys):
    assert cli.main([str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: cannot read the sweep file" in capsys.readouterr().err
    assert cli.main(["nosuchsweep"]) == 2
    assert "not a bundled sweep (bundled: conveyor_film, convnext_doc, digits)" in \
        capsys.readouterr().err
    path = write(tmp_path, GOOD)
    assert cli.main([path, "train.epochz=1", "--out", str(tmp_path / "o")]) == 2
    assert "train.epochz: unknown key" in capsys.readouterr().err


def test_space_kinds_parse_and_every_bundled_sweep_loads():
    assert parse_param("a.b", {"int": [16, 64], "step": 16}).grid() == [16, 32, 48, 64]
    p = parse_param("a.b", {"float": [1, 2], "log": True})
    assert (p.low, p.high, p.log) == (1.0, 2.0, True) and isinstance(p.low, float)
    for name in ("digits", "convnext_doc", "conveyor_film"):
        sweep = load_sweep(name)
        assert sweep.name == name and sweep.space and sweep.budget > 0
    digits = load_sweep("digits", trials=3, overrides=["train.max_steps=7"])
    assert digits.budget == 3 and digits.trial_config({}).train.max_steps == 7
    assert load_sweep("convnext_doc").metric == "macro_f1"
    assert load_sweep("digits").direction == "maximize"


def _sequence(tmp_path, name: str, seed: int, n: int = 6) -> list[dict]:
    """Ask ``n`` trials one after another, each told a value that depends on its parameters."""
    sweep = load_sweep(write(tmp_path, with_(sampler={"name": "tpe", "seed": seed,
                                                      "n_startup_trials": 2}), f"{name}.yaml"))
    study = cli.open_sweep(sweep, str(tmp_path / name))
    params = []
    for _ in range(n):
        job = study.next_job(worker_identity())
        params.append(job.params)
        study.study.tell(job.number, -abs(job.params["optim.lr"] - 0.01)
                         + job.params["train.batch_size"] / 1000)
    return params


def test_same_seed_gives_the_same_parameter_sequence(tmp_path):
    a, b = _sequence(tmp_path, "a", seed=3), _sequence(tmp_path, "b", seed=3)
    assert a == b and len({p["optim.lr"] for p in a}) == 6
    assert _sequence(tmp_path, "c", seed=4) != a


def test_budget_resume_and_lost_trials(tmp_path):
    """A preempted trial is handed out again with its number; a trial whose worker died is
    failed, its parameters queued again, and its budget given back; nothing beyond the budget."""
    sweep = load_sweep(write(tmp_path, with_(trials=3, heartbeat_s=1, grace_s=5)))
    study = cli.open_sweep(sweep, str(tmp_path / "out"))
    me = worker_identity()
    first, second = study.next_job(me), study.next_job(me)
    # The first trial's worker was preempted: it resumes, same number and parameters.
    study.preempted(first)
    again = study.next_job(me)
    assert (again.number, again.params, again.resume) == (first.number, first.params, True)
    # The second trial's worker died without a word: a local pid that is gone...
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study.storage.set_trial_user_attr(second.trial_id, WORKER,
                                      {**me, "pid": dead.pid, "id": "gone"})
    third = study.next_job(me)  # the retry of the second trial, from the queue
    lost = study.storage.get_trial(second.trial_id)
    assert lost.state == TrialState.FAIL and "is gone" in lost.user_attrs[LOST]
    assert third.params == second.params and third.number == 2 and not third.resume
    assert study.storage.get_trial(third.trial_id).user_attrs[RETRY_OF] == second.number
    # ...and a heartbeat older than grace_s (a worker on another host).
    study.storage.set_trial_user_attr(third.trial_id, WORKER, {"host": "elsewhere", "pid": 1})
    study.storage.set_trial_user_attr(third.trial_id, HEARTBEAT, time.time() - 60)
    fourth = study.next_job(me)
    assert fourth.params == second.params and "no heartbeat for" in \
        study.storage.get_trial(third.trial_id).user_attrs[LOST]
    # Budget 3: trials 0 (running), 3 (retry of the retry) and one new one; then no more.
    study.study.tell(first.number, 0.5)
    study.study.tell(fourth.number, 0.6)
    last = study.next_job(me)
    assert last is not None and not last.resume and last.number == 4
    assert study.next_job(me) is None
    study.study.tell(last.number, 0.7)
    assert study.finished() and study.used_budget() == 3
    assert not any(t.user_attrs.get(PREEMPTED) for t in study.trials())


def test_sweep_folder_is_never_reused_by_accident(tmp_path, capsys):
    path = write(tmp_path, GOOD)
    out = str(tmp_path / "out")
    cli.open_sweep(load_sweep(path), out)
    assert cli.main([path, "--out", out]) == 2
    assert "already holds sweep 's'; pass --resume" in capsys.readouterr().err
    changed = write(tmp_path, with_(space={"optim.lr": {"float": [1e-3, 1e-1]}}))
    assert cli.main([changed, "--out", out, "--resume"]) == 2
    assert "differs from the sweep in" in capsys.readouterr().err
    assert cli.main([path, "--out", str(tmp_path / "none"), "--worker"]) == 2
    assert "no sweep there to continue" in capsys.readouterr().err


def test_study_package_import_stays_light():
    """The trainer imports ddp_train.sweep.link on every run: it must not pull in Optuna."""
    code = ("import sys, ddp_train.sweep.link; "
            "assert 'optuna' not in sys.modules, 'optuna imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_config_error_type():
    with pytest.raises(ConfigError):
        parse_param("x", {"int": [1.5, 3]})


def test_study_reopens_with_its_settings(tmp_path):
    path = write(tmp_path, GOOD)
    out = str(tmp_path / "out")
    cli.open_sweep(load_sweep(path), out)
    again = cli.open_sweep(load_sweep(path, trials=9), out, joining=True)  # budget may change
    assert isinstance(again, SweepStudy)
    assert again.study.user_attrs["sweep"]["metric"] == "acc"
    assert again.sweep.budget == 9


def test_every_sampler_and_pruner_builds_and_the_time_budget_stops_new_trials(tmp_path):
    from ddp_train.sweep.spec import PrunerConfig, SamplerConfig
    from ddp_train.sweep.study import build_pruner, build_sampler

    sweep = load_sweep(write(tmp_path, with_(space={"model.name": {"choice": ["a", "b"]},
                                                    "train.batch_size": {"int": [16, 32],
                                                                         "step": 16}},
                                             sampler={"name": "grid"}, trials=0)))
    assert sweep.budget == 4  # the whole grid
    kinds = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
             "grid": optuna.samplers.GridSampler}
    for name, cls in kinds.items():
        assert isinstance(build_sampler(SamplerConfig(name=name), sweep), cls)
    pruners = {"median": optuna.pruners.MedianPruner, "none": optuna.pruners.NopPruner,
               "hyperband": optuna.pruners.HyperbandPruner}
    for name, cls in pruners.items():
        assert isinstance(build_pruner(PrunerConfig(name=name)), cls)
        assert isinstance(build_pruner(vars(PrunerConfig(name=name))), cls)  # a stored copy
    timed = load_sweep(write(tmp_path, with_(trials=0, timeout_min=1.0), "t.yaml"))
    study = cli.open_sweep(timed, str(tmp_path / "timed"))
    assert study.next_job(worker_identity()) is not None
    study.study.set_user_attr("started", time.time() - 61)  # the minute is up
    assert study.next_job(worker_identity()) is None


def test_a_study_of_another_sweep_is_not_joined(tmp_path, capsys):
    """Two sweep folders pointed at one storage with the same study name but different spaces
    would mix their trials: the second is refused."""
    storage = str(tmp_path / "shared.journal")
    assert cli.open_sweep(load_sweep(write(tmp_path, GOOD)), str(tmp_path / "a"), storage)
    other = write(tmp_path, with_(space={"optim.lr": {"float": [1e-3, 1e-1]}}), "s2.yaml")
    with open(other, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["name"] = "s"  # the same study name
    path = write(tmp_path, data, "s3.yaml")
    assert cli.main([path, "--out", str(tmp_path / "b"), "--storage", storage]) == 2
    assert "belongs to a different sweep" in capsys.readouterr().err


def test_parallel_trials_get_disjoint_gpu_slices():
    from ddp_train.dist import gpu_slices, split_gpus

    assert split_gpus(["0", "1", "2", "3"], 4, 1) == ["0", "1", "2", "3"]
    assert split_gpus(["0", "1", "2", "3"], 1, 4) == ["0,1,2,3"]
    assert split_gpus(["4", "5", "6", "7"], 2, 2) == ["4,5", "6,7"]  # what Slurm gave us
    with pytest.raises(ConfigError, match=r"--parallel 3 x 2 GPU\(s\) per trial needs 6 GPUs; "
                                          r"4 visible \(0,1,2,3\)"):
        split_gpus(["0", "1", "2", "3"], 3, 2)
    import torch

    if not torch.cuda.is_available():
        assert gpu_slices(3, 2) == [None, None, None]  # CPU trials share the cores
