"""``ddp-train cv``: k-fold cross-validation — train the K fold runs, then write out-of-fold
predictions, per-fold metrics and the fold ensemble's test metrics.

    ddp-train cv --config convnext_base_384_doc_cv5 [--out DIR] [--folds all|0,2] [--ranks R]
    ddp-train cv --config X --slurm --gpus 4 --time 1-00:00:00 [--array-parallel 2] [--dry-run]
    ddp-train cv --config X --collect              # (re)write oof.jsonl, summary.json, report.md

The shards must be packed with ``--folds K``. Fold k is an ordinary, resumable ddp-train run in
``DIR/fold<k>`` (``data.fold=k``, config in ``DIR/fold<k>/cv.yaml``), launched as a subprocess
(``torchrun --standalone`` for R > 1 ranks) one fold after the other. A re-run skips finished
folds (their metrics.jsonl ends with an ``end`` event) and resumes unfinished ones; a stop signal
is passed to the running fold, which checkpoints, and cv exits 128+N. :func:`run_cv` is the
Python API; :mod:`ddp_train.cv_results` writes the results. See docs/cv.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Optional, Sequence

from . import logformat as fmt
from .config import ConfigError, dump_yaml, load_config
from .submit import add_array_options

FOLD_CONFIG = "cv.yaml"  # a fold's resolved config, in its run folder
FOLD_LOG = "cv.log"  # the fold processes' stdout and stderr, appended per launch
CV_JSON = "cv.json"  # what the cv folder holds: config, overrides, shards, K
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line of ``ddp-train cv``."""
    p = argparse.ArgumentParser(prog="ddp-train cv",
                                description="k-fold cross-validation: train every fold, then "
                                            "write out-of-fold predictions and a report "
                                            "(docs/cv.md).")
    p.add_argument("--config", metavar="FILE|NAME",
                   help="config (file or bundled name) whose data.shards were packed with "
                        "--folds K")
    p.add_argument("--out", default="", help="cv folder (default cv/<run.name>)")
    p.add_argument("--folds", default="all", help="folds to run: all, or e.g. 0,2 (default all)")
    p.add_argument("--ranks", type=int, default=1, help="ranks per fold run (torchrun if > 1)")
    p.add_argument("--oof-checkpoint", choices=("last", "best"), default="last",
                   help="checkpoint that scores each fold's OOF samples and the test split "
                        "(default last: best.pt was selected on the OOF fold itself)")
    p.add_argument("--collect", "--report", action="store_true", dest="collect",
                   help="train nothing: write oof.jsonl, summary.json and report.md from the "
                        "finished folds")
    p.add_argument("--device", default="auto", help="device for the OOF/test scoring")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    slurm = p.add_argument_group("Slurm (--slurm): one array task per unfinished fold")
    slurm.add_argument("--slurm", action="store_true", help="submit the folds as a job array")
    slurm.add_argument("--array-parallel", type=int, default=0, metavar="N",
                       help="at most N folds at once (%%N of --array; 0 = no limit)")
    add_array_options(slurm, "fold", "--ranks")
    return p.parse_intermixed_args(argv)


# ----------------------------------------------------------------------------------- plan


def parse_folds(text: str, num_folds: int) -> list[int]:
    """``all`` -> 0..K-1; ``0,2`` -> [0, 2]; ConfigError for anything else or a fold >= K."""
    if text.strip() == "all":
        return list(range(num_folds))
    try:
        folds = [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise ConfigError(f"--folds {text}: give all or comma-separated fold numbers") from None
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad or not folds:
        raise ConfigError(f"--folds {text}: the shards have {num_folds} folds (0..{num_folds - 1})")
    return sorted(set(folds))


def plan(config: Optional[str], overrides: Sequence[str], folds: str = "all",
         out: str = "") -> SimpleNamespace:
    """Validate everything before anything runs: the config (as every fold will load it), the
    folds record of its shards and ``--folds``. Returns ``cfg, out, num_folds, folds``."""
    from .shards.manifest import load_manifest

    cfg = load_config(config, list(overrides))
    if cfg.data.fold != -1:
        raise ConfigError(f"data.fold: {cfg.data.fold} is set, but ddp-train cv sets it per fold "
                          "(remove it from the config and the overrides)")
    try:
        manifest = load_manifest(cfg.data.shards)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.shards: {e}") from None
    if not manifest.folds:
        raise ConfigError(f"data.shards: {cfg.data.shards} was packed without folds (repack "
                          "with ddp-shards pack SRC --folds K)")
    num_folds = int(manifest.folds["num_folds"])
    out = os.path.abspath(out or os.path.join("cv", cfg.run.name))
    chosen = parse_folds(folds, num_folds)
    for k in chosen:  # every fold's config must load (a run.path in overrides is replaced)
        load_config(config, fold_overrides(overrides, out, k))
    return SimpleNamespace(cfg=cfg, out=out, num_folds=num_folds, folds=chosen)


def fold_overrides(overrides: Sequence[str], out: str, k: int) -> list[str]:
    """The overrides of fold ``k``: the user's, then its fold and its own run folder."""
    from .cv_results import fold_dir

    return [*overrides, f"data.fold={k}", f"run.path={fold_dir(out, k)}"]


def fold_state(run_dir: str) -> str:
    """``done`` (metrics.jsonl's last event is ``end``), ``partial`` (a run was started there)
    or ``new``."""
    last = None
    try:
        with open(os.path.join(run_dir, fmt.METRICS), "rb") as f:
            for line in f:
                if fmt.EVENT_MARK in line:
                    try:
                        last = fmt.loads(line).get("event", last)
                    except ValueError:  # a torn line of a killed run
                        continue
    except OSError:
        pass
    if last == "end":
        return "done"
    started = any(os.path.exists(os.path.join(run_dir, name))
                  for name in ("checkpoints", fmt.METRICS, "config.yaml"))
    return "partial" if started else "new"


def fold_command(config: str, ranks: int, resume: bool) -> list[str]:
    """The command line of one fold run (as a sweep trial's: python -m ddp_train, or torchrun)."""
    from .sweep.worker import trial_command

    return trial_command(config, ranks, resume)


def write_fold_config(config: Optional[str], overrides: Sequence[str], out: str, k: int) -> str:
    """Resolve fold ``k``'s config and write it to ``DIR/fold<k>/cv.yaml``; returns the path."""
    from .cv_results import fold_dir

    cfg = load_config(config, fold_overrides(overrides, out, k))
    os.makedirs(fold_dir(out, k), exist_ok=True)
    path = os.path.join(fold_dir(out, k), FOLD_CONFIG)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)
    return path


def _write_cv_json(p: SimpleNamespace, config: Optional[str], overrides: Sequence[str]) -> None:
    from .config.load import resolve_config_path

    os.makedirs(p.out, exist_ok=True)
    doc = {"config": os.path.abspath(resolve_config_path(config)) if config else "",
           "overrides": list(overrides), "shards": p.cfg.data.shards, "num_folds": p.num_folds,
           "name": p.cfg.run.name}
    with open(os.path.join(p.out, CV_JSON), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)


# ------------------------------------------------------------------------------------ run


def _log(text: str) -> None:
    print(f"ddp-train cv: {text}", flush=True)


def run_fold(config_path: str, run_dir: str, ranks: int, resume: bool, stop: dict) -> int:
    """Run one fold to its end, or until a stop signal (passed on once; the fold checkpoints).
    Output goes to ``run_dir/cv.log``; returns the exit status."""
    env = dict(os.environ)
    with open(os.path.join(run_dir, FOLD_LOG), "ab") as log:
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} "
                  f"{'resumed' if resume else 'started'} by ddp-train cv\n".encode())
        log.flush()
        proc = subprocess.Popen(fold_command(config_path, ranks, resume), stdout=log,
                                stderr=subprocess.STDOUT, env=env)
        forwarded = False
        while True:
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if stop["signal"] and not forwarded:
                # torchrun passes SIGTERM on to its ranks; each checkpoints and exits 143.
                proc.send_signal(signal.SIGTERM)
                forwarded = True


def run_cv(config: Optional[str], *, out: str = "", folds: str = "all", ranks: int = 1,
           overrides: Sequence[str] = (), oof_checkpoint: str = "last", collect_only: bool = False,
           device: str = "auto") -> dict:
    """Train the chosen folds one after another (skipping finished ones, resuming unfinished
    ones), then collect the results. Returns ``{out, signal, summary}``: ``signal`` is the stop
    signal's number (0 = none; then nothing is collected), ``summary`` the results (None when a
    fold failed or training stopped). ConfigError for bad inputs, before anything runs."""
    if ranks < 1:
        raise ConfigError(f"--ranks {ranks}: must be >= 1")
    p = plan(config, overrides, folds, out)
    result = {"out": p.out, "signal": 0, "summary": None, "failed": []}
    if not collect_only:
        _write_cv_json(p, config, overrides)
        stop = {"signal": 0}

        def handle(signum, frame):
            if not stop["signal"]:
                _log(f"got {signal.Signals(signum).name}: stopping the running fold at its next "
                     "step (it checkpoints; run ddp-train cv again to resume)")
            stop["signal"] = stop["signal"] or signum

        previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS}
        try:
            for k in p.folds:
                if stop["signal"]:
                    break
                rc = _train_fold(config, overrides, p.out, k, ranks, stop)
                if rc != 0 and not stop["signal"]:
                    result["failed"].append(k)
        finally:
            for s, old in previous.items():
                signal.signal(s, old)
        result["signal"] = stop["signal"]
        if stop["signal"] or result["failed"]:
            return result
    from .cv_results import collect, fold_dir

    unfinished = [k for k in p.folds if fold_state(fold_dir(p.out, k)) != "done"]
    if unfinished:
        raise ConfigError(f"fold(s) {', '.join(map(str, unfinished))} of {p.out} have not "
                          "finished: run ddp-train cv without --collect (or wait for the array)")
    result["summary"] = collect(
        p.out, p.cfg.data.shards, p.folds, p.num_folds, oof_checkpoint=oof_checkpoint,
        early_stop_metric=p.cfg.early_stop.metric, device=device,
        batch_size=p.cfg.eval.batch_size or p.cfg.train.batch_size,
        header={"name": p.cfg.run.name, "config": config or "", "overrides": list(overrides)})
    return result


def _train_fold(config, overrides, out: str, k: int, ranks: int, stop: dict) -> int:
    from .cv_results import fold_dir

    run_dir = fold_dir(out, k)
    state = fold_state(run_dir)
    if state == "done":
        _log(f"fold {k}: finished already ({run_dir}), skipped")
        return 0
    path = os.path.join(run_dir, FOLD_CONFIG)
    if state == "new" or not os.path.exists(path):  # a resumed fold keeps its own config
        path = write_fold_config(config, overrides, out, k)
    _log(f"fold {k}: {'resumes' if state == 'partial' else 'starts'} ({run_dir}, log "
         f"{os.path.join(run_dir, FOLD_LOG)})")
    t0 = time.monotonic()
    rc = run_fold(path, run_dir, ranks, resume=state == "partial", stop=stop)
    what = {0: "finished"}.get(rc, "checkpointed and stopped" if stop["signal"]
                               else f"failed (exit {rc})")
    _log(f"fold {k}: {what} after {time.monotonic() - t0:.0f} s")
    return rc


# ---------------------------------------------------------------------------------- Slurm


def submit_folds(args: argparse.Namespace) -> int:
    """Render (and submit) one Slurm array task per unfinished fold through slurm/train.sbatch:
    the normal training body with the fold's ``data.fold``, ``run.path`` and ``run.resume=auto``
    (so a resubmitted array continues its folds)."""
    from . import submit
    from .cv_results import fold_dir

    p = plan(args.config, args.overrides, args.folds, args.out)
    todo = [k for k in p.folds if fold_state(fold_dir(p.out, k)) != "done"]
    if not todo:
        _log(f"every fold of {p.out} has finished: ddp-train cv --config ... --collect")
        return 0
    combos = [[f"data.fold={k}", f"run.path={fold_dir(p.out, k)}", "run.resume=auto"]
              for k in todo]
    gpus = args.ranks if args.gpus < 0 else args.gpus
    name = f"cv-{p.cfg.run.name}"
    options = SimpleNamespace(
        job_name=name, nodes=1, gpus=gpus, ranks_per_node=args.ranks,
        cpus_per_task=args.cpus_per_task, time=args.time, signal_before=args.signal_before,
        partition=args.partition, account=args.account, config=args.config or "",
        overrides=[*args.overrides, *(combos[0] if len(combos) == 1 else [])],
        sbatch_option=args.sbatch_option)
    text = submit.render(options, p.out, name, combos if len(combos) > 1 else [[]])
    if args.array_parallel > 0 and len(combos) > 1:  # Slurm's %N: at most N tasks at once
        text = text.replace(f"--array=0-{len(combos) - 1}\n",
                            f"--array=0-{len(combos) - 1}%{args.array_parallel}\n", 1)
    text = text.replace("\nset -- ",
                        f"\n# array tasks 0..{len(todo) - 1} train folds {todo}\nset -- ", 1)
    if args.dry_run:
        print(text, end="")
        return 0
    _write_cv_json(p, args.config, args.overrides)
    for k in todo:
        write_fold_config(args.config, args.overrides, p.out, k)
    os.makedirs(os.path.join(p.out, "slurm"), exist_ok=True)
    script = os.path.join(p.out, "slurm", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
    with open(script, "w", encoding="utf-8") as f:
        f.write(text)
    job_id = submit.submit(script)
    print(job_id)
    again = " ".join(["ddp-train cv", *(["--config", args.config] if args.config else []),
                      "--out", p.out, *args.overrides, "--report"])
    print(f"folds {', '.join(map(str, todo))}: script {script}; logs {p.out}/slurm/; when the "
          f"array is done: {again}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------ CLI


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``ddp-train cv``: 0 done, 1 a fold failed, 2 bad input (nothing trained),
    128+N stopped by signal N (the running fold checkpointed; run again to resume)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.config is None and args.collect and args.out:  # --collect alone: cv.json
            with open(os.path.join(args.out, CV_JSON), encoding="utf-8") as f:
                known = json.load(f)
            args.config, args.overrides = known["config"] or None, known["overrides"]
        if args.slurm:
            return submit_folds(args)
        result = run_cv(args.config, out=args.out, folds=args.folds, ranks=args.ranks,
                        overrides=args.overrides, oof_checkpoint=args.oof_checkpoint,
                        collect_only=args.collect, device=args.device)
    except (ConfigError, OSError, ValueError) as e:
        print(f"ddp-train cv: error: {str(e).splitlines()[0] if str(e) else e!r}",
              file=sys.stderr)
        return 2
    if result["signal"]:
        return 128 + result["signal"]
    if result["failed"]:
        _log(f"fold(s) {', '.join(map(str, result['failed']))} failed: see their cv.log; "
             "run ddp-train cv again to retry")
        return 1
    s = result["summary"]
    # A fold without a val record (max_steps inside an epoch, no eval.every_steps) has no val
    # metrics; the per-fold OOF scores always exist.
    which = "val" if s["mean_std"]["val_last"]["acc"] else "OOF"
    spread = s["mean_std"]["val_last"]["acc"] or s["mean_std"]["oof"]["acc"]
    test = s["test"]
    _log(f"{len(s['per_fold'])} folds: {which} acc {spread['mean']:.4f} ± {spread['std']:.4f}; "
         f"OOF acc {s['oof']['acc']:.4f} macro-F1 {s['oof']['macro_f1']:.4f} on "
         f"{s['oof']['count']} samples"
         + (f"; test (fold ensemble) acc {test['acc']:.4f}" if test else "")
         + f"; {os.path.join(result['out'], 'oof.jsonl')}, {s['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
