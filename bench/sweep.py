"""Sweep benchmark: what a trial costs beyond its training, against the same run without a sweep.

Full run (about 3 minutes on the 2-core shared VM)::

    .venv/bin/python bench/sweep.py

Smoke run::

    .venv/bin/python bench/sweep.py --trials 2 --steps 10

It runs ``ddp-train sweep`` on the bundled digits demo (``--ranks`` CPU ranks per trial, no
pruner, ``--steps`` updates, one val eval at the end) and times each trial from the logs:

* start -> first step: from the moment the worker asked the study for the trial (Optuna's
  ``datetime_start``) to the trial's first step record;
* training: first to last step record;
* last step -> next trial: from the last step record to the next trial's ``datetime_start``
  (final eval, checkpoint, process exit, telling the study, asking for the next trial).

The baseline, measured in the same run with the same config: a plain ``torchrun -m ddp_train``
launch (what a user runs without a sweep), timed from the launch to its first step record and
from its last step record to the process exit. Ratios are overhead / training time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=40, help="optimizer updates per trial")
    return p.parse_args()


def step_times(run_dir: str) -> tuple[float, float]:
    """Unix times of the first and the last step record of a run."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        times = [r["time"] for r in map(json.loads, f) if "loss" in r]
    return times[0], times[-1]


def env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)


def main() -> None:
    args = parse_args()
    import optuna

    from ddp_train.demo import ensure_digits
    from ddp_train.dist import DistInfo
    from ddp_train.sweep.study import open_storage

    work = tempfile.mkdtemp(prefix="bench-sweep-")
    shards = os.path.join(work, "digits")
    ensure_digits(shards, DistInfo())
    overrides = {"data.shards": shards, "data.num_workers": 0, "train.max_steps": args.steps,
                 "eval.every_steps": args.steps, "eval.every_epoch": False,
                 "eval.test_at_end": False, "log.progress": "none"}
    sweep_file = os.path.join(work, "bench.yaml")
    with open(sweep_file, "w", encoding="utf-8") as f:
        yaml.safe_dump({"name": "bench", "base": "digits", "ranks": args.ranks,
                        "trials": args.trials, "overrides": overrides,
                        "pruner": {"name": "none"}, "sampler": {"name": "random", "seed": 0},
                        "space": {"optim.lr": {"float": [1e-3, 1e-2], "log": True}}}, f)
    out = os.path.join(work, "sweep")
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "ddp_train", "sweep", sweep_file, "--out", out],
                   env=env(), check=True, stdout=subprocess.DEVNULL)
    sweep_s = time.time() - t0
    study = optuna.load_study(study_name="bench",
                              storage=open_storage(os.path.join(out, "study.journal")))
    trials = sorted(study.trials, key=lambda t: t.datetime_start)
    rows = []
    for i, t in enumerate(trials):
        first, last = step_times(os.path.join(out, "trials", str(t.number)))
        start = t.datetime_start.timestamp()
        after = (trials[i + 1].datetime_start.timestamp() if i + 1 < len(trials)
                 else t.datetime_complete.timestamp())
        rows.append({"trial": t.number, "to_first_step": first - start,
                     "training": last - first, "after_last_step": after - last})

    # Baseline: the trial's own config, launched as a plain run.
    config = os.path.join(out, "trials", str(trials[0].number), "trial.yaml")
    base_dir = os.path.join(work, "plain")
    launch = [sys.executable, "-m", "ddp_train"]
    if args.ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={args.ranks}", "-m", "ddp_train"]
    t0 = time.time()
    subprocess.run([*launch, "--config", config, f"run.path={base_dir}", "sweep.storage=''",
                    "sweep.study=''", "sweep.trial=-1"], env=env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t_end = time.time()
    first, last = step_times(base_dir)
    plain = {"to_first_step": first - t0, "training": last - first, "after_last_step": t_end - last}

    print(f"{args.trials} trials x {args.ranks} rank(s) x {args.steps} steps; sweep took "
          f"{sweep_s:.1f} s in all")
    print(f"{'':>14}{'to 1st step':>13}{'training':>10}{'after last':>12}{'overhead/train':>16}")
    for r in rows:
        over = r["to_first_step"] + r["after_last_step"]
        print(f"{'trial ' + str(r['trial']):>14}{r['to_first_step']:>12.1f}s"
              f"{r['training']:>9.1f}s{r['after_last_step']:>11.1f}s{over / r['training']:>16.2f}")
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "trial"}
    over_sweep = (med["to_first_step"] + med["after_last_step"]) / med["training"]
    over_plain = (plain["to_first_step"] + plain["after_last_step"]) / plain["training"]
    print(f"{'sweep median':>14}{med['to_first_step']:>12.1f}s{med['training']:>9.1f}s"
          f"{med['after_last_step']:>11.1f}s{over_sweep:>16.2f}")
    print(f"{'plain run':>14}{plain['to_first_step']:>12.1f}s{plain['training']:>9.1f}s"
          f"{plain['after_last_step']:>11.1f}s{over_plain:>16.2f}")
    extra = (med["to_first_step"] + med["after_last_step"]
             - plain["to_first_step"] - plain["after_last_step"])
    print(f"sweep overhead beyond a plain launch: {extra:+.1f} s per trial; "
          f"overhead ratio sweep / plain: {over_sweep / over_plain:.2f}")


if __name__ == "__main__":
    main()
