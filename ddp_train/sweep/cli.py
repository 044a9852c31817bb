"""``ddp-train sweep SWEEP.yaml``: an Optuna study whose trials are ddp-train runs.

    ddp-train sweep configs/sweeps/digits.yaml                    # sequential, on this machine
    ddp-train sweep my_sweep.yaml --parallel 4                    # 4 trials at once, own GPUs
    ddp-train sweep my_sweep.yaml --slurm --array 8 --gpus 1      # 8 Slurm workers
    ddp-train sweep my_sweep.yaml --resume                        # continue a stopped sweep

:func:`run_sweep` is the Python API; the command line is a thin layer over it. The sweep folder
(default ``sweeps/<name>``) holds ``sweep.json`` (what it is and where its study lives), the
study (``study.journal`` unless ``--storage``), ``trials/<number>/`` run folders, ``report.md``
and ``best.yaml``. See docs/sweeps.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from types import SimpleNamespace
from typing import Optional

from ..config import ConfigError
from ..submit import add_array_options
from .spec import Sweep, load_sweep

SWEEP_JSON = "sweep.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line of ``ddp-train sweep``."""
    p = argparse.ArgumentParser(prog="ddp-train sweep",
                                description="Run an Optuna sweep of ddp-train runs "
                                            "(docs/sweeps.md).")
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file, or the name of a bundled "
                   "one (digits, convnext_doc, conveyor_film)")
    p.add_argument("--out", default="", help="sweep folder (default sweeps/<name>)")
    p.add_argument("--trials", type=int, help="trials to finish (replaces the file's trials)")
    p.add_argument("--storage", default="", metavar="URL",
                   help="SQLAlchemy URL of the study, e.g. postgresql+psycopg://user@host/db "
                        "(default: <out>/study.journal)")
    p.add_argument("--parallel", type=int, default=1, metavar="P",
                   help="trials at once on this machine, each on its own GPUs (default 1)")
    p.add_argument("--resume", action="store_true", help="continue the sweep in --out")
    p.add_argument("--report", action="store_true",
                   help="only rewrite report.md and best.yaml from the study")
    p.add_argument("--worker", action="store_true",
                   help="join the sweep in --out and run trials until it is done "
                        "(what the Slurm array tasks run)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides for every trial (join the file's overrides)")
    slurm = p.add_argument_group("Slurm (--slurm)")
    slurm.add_argument("--slurm", action="store_true", help="submit workers as a Slurm array")
    slurm.add_argument("--array", type=int, default=1, metavar="K", help="Slurm workers")
    add_array_options(slurm, "worker", "the sweep's ranks")
    return p.parse_intermixed_args(argv)


def _folder_state(sweep: Sweep, out: str, storage: str, joining: bool) -> str:
    """Check the sweep folder against this sweep; returns the storage URL to use."""
    from .study import JOURNAL

    path = os.path.join(out, SWEEP_JSON)
    if not os.path.exists(path):
        if joining:
            raise ConfigError(f"--out {out}: no sweep there to continue (no {SWEEP_JSON}); "
                              "start it without --resume/--worker")
        return storage or os.path.abspath(os.path.join(out, JOURNAL))
    with open(path, encoding="utf-8") as f:
        known = json.load(f)
    if not joining:
        raise ConfigError(f"--out {out} already holds sweep {known['name']!r}; pass --resume to "
                          "continue it, or choose another --out")
    if storage and storage != known["storage"]:
        raise ConfigError(f"--storage: this sweep's study is in {known['storage']}, "
                          f"not {storage}")
    now = sweep.identity()
    changed = sorted(k for k in set(now) | set(known["identity"])
                     if now.get(k) != known["identity"].get(k))
    if changed or known["name"] != sweep.name:
        raise ConfigError(f"{sweep.path}: differs from the sweep in {out} in "
                          f"{', '.join(changed) or 'name'}; only trials and timeout_min may "
                          "change when a sweep continues")
    return known["storage"]


def open_sweep(sweep: Sweep, out: str, storage: str = "", joining: bool = False):
    """Create (or, ``joining``, reopen) the sweep folder and its study; returns the study."""
    from .study import SweepStudy

    os.makedirs(out, exist_ok=True)
    url = _folder_state(sweep, out, storage, joining)
    study = SweepStudy(sweep, url, out)
    study.initialise()  # once, before any worker: concurrent creation races (UniqueViolation)
    path = os.path.join(out, SWEEP_JSON)
    if not os.path.exists(path):
        with open(f"{path}.tmp", "w", encoding="utf-8") as f:
            json.dump({"name": sweep.name, "storage": url, "sweep_file": os.path.abspath(
                sweep.path), "identity": sweep.identity()}, f, indent=1)
        os.replace(f"{path}.tmp", path)
    return study


def run_sweep(path: str, *, out: str = "", trials: Optional[int] = None, storage: str = "",
              parallel: int = 1, resume: bool = False, worker: bool = False,
              overrides: list[str] = ()) -> dict:
    """Run (or continue) sweep ``path`` on this machine until its budget is spent or a stop
    signal arrives; write the report and best.yaml. Returns the summary (``signal`` set when
    stopped by one). Raises ConfigError for a bad sweep file or folder."""
    from .. import dist
    from ..demo import DEFAULT_ROOT, ensure_digits
    from .results import write_results
    from .worker import Worker, install_stop, uninstall_stop

    sweep = load_sweep(path, trials, overrides)
    out = out or os.path.join("sweeps", sweep.name)
    if parallel < 1:
        raise ConfigError(f"--parallel {parallel}: must be >= 1")
    slices = dist.gpu_slices(parallel, sweep.cfg.ranks)
    if sweep.trial_config({}).data.shards == DEFAULT_ROOT:  # packed once, before trials race
        ensure_digits(DEFAULT_ROOT, dist.DistInfo())
    study = open_sweep(sweep, out, storage, joining=resume or worker)
    stop = threading.Event()
    previous = install_stop(stop)
    try:
        workers = [Worker(sweep, study, stop=stop, index=i, gpus=gpus)
                   for i, gpus in enumerate(slices)]
        threads = [threading.Thread(target=w.run, name=f"sweep-worker-{i}", daemon=True)
                   for i, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():  # join with a timeout: signals reach the main thread meanwhile
                t.join(timeout=0.5)
    finally:
        received = uninstall_stop(previous)
    with study.locked():  # one writer at a time when several workers finish together
        summary = write_results(study)
    summary["signal"] = received
    summary["preempted"] = any(w.preempted for w in workers)
    return summary


def submit_workers(args: argparse.Namespace) -> int:
    """Create the study, then render and submit ``--array`` workers (slurm/train.sbatch)."""
    from .. import submit

    sweep = load_sweep(args.sweep, args.trials, args.overrides)
    out = os.path.abspath(args.out or os.path.join("sweeps", sweep.name))
    if not args.dry_run:
        open_sweep(sweep, out, args.storage, joining=args.resume)
    gpus = sweep.cfg.ranks if args.gpus < 0 else args.gpus
    options = SimpleNamespace(
        job_name=f"sweep-{sweep.name}", nodes=1, gpus=gpus, ranks_per_node=sweep.cfg.ranks,
        cpus_per_task=args.cpus_per_task, time=args.time, signal_before=args.signal_before,
        partition=args.partition, account=args.account, config="", overrides=args.overrides,
        sbatch_option=[f"--array=0-{args.array - 1}", *args.sbatch_option])
    text = submit.render(options, out, options.job_name, [[]])
    # The body runs a sweep worker instead of one training run when SWEEP_DIR is set.
    text = text.replace("\nset -- ", "\n" + "\n".join([
        f"export SWEEP_FILE={_quote(os.path.abspath(sweep.path))}",
        f"export SWEEP_DIR={_quote(out)}", f"export PYTHON={_quote(sys.executable)}"])
        + "\nset -- ", 1)
    if args.dry_run:
        print(text, end="")
        return 0
    script = os.path.join(out, "slurm", f"workers-{len(os.listdir(out))}.sbatch")
    os.makedirs(os.path.dirname(script), exist_ok=True)
    with open(script, "w", encoding="utf-8") as f:
        f.write(text)
    job_id = submit.submit(script)
    print(job_id)
    print(f"{args.array} workers: script {script}; logs {out}/slurm/; report {out}/report.md",
          file=sys.stderr)
    return 0


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``ddp-train sweep``; returns the exit code (2: bad sweep file/folder)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.slurm:
            if args.array < 1:
                raise ConfigError(f"--array {args.array}: must be >= 1")
            return submit_workers(args)
        if args.report:
            from .results import write_results

            sweep = load_sweep(args.sweep, args.trials, args.overrides)
            study = open_sweep(sweep, args.out or os.path.join("sweeps", sweep.name),
                               args.storage, joining=True)
            summary = write_results(study)
        else:
            summary = run_sweep(args.sweep, out=args.out, trials=args.trials,
                                storage=args.storage, parallel=args.parallel,
                                resume=args.resume, worker=args.worker,
                                overrides=args.overrides)
    except ConfigError as e:
        print(f"ddp-train sweep: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # optuna missing: the [sweep] extra
        print(f"ddp-train sweep: error: {e}; install the extra: pip install 'ddp-train[sweep]'",
              file=sys.stderr)
        return 2
    best = summary["best"]
    counts: dict = {}
    for row in summary["trials"]:
        counts[row["state"].lower()] = counts.get(row["state"].lower(), 0) + 1
    print(f"ddp-train sweep: {sum(counts.values())} trials ("
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + "); "
          + (f"best trial {best}: val {summary['metric']} "
             f"{next(r['value'] for r in summary['trials'] if r['number'] == best):.4g}; "
             f"{summary['best_yaml']}" if best is not None else "no complete trial yet")
          + f"; report {summary['report']}", flush=True)
    if summary.get("signal"):
        return 128 + summary["signal"]
    return 0
