"""``ddp-train submit``: render an sbatch script for a config and submit it to Slurm.

The script is ``slurm/train.sbatch`` (one node) or ``slurm/train_multinode.sbatch`` (several),
read from the installed package (:mod:`ddp_train.bundled`), with its ``#SBATCH`` lines replaced
by the options given here, the config and overrides baked in, and, for ``--sweep``, a job array
with one override combination per array task. The config is validated (for every combination)
before anything is written or submitted. The rendered file is kept next to the Slurm logs in
``<run.dir>/slurm/`` (or ``--out``) so the job can be resubmitted with plain ``sbatch FILE``.
See docs/slurm.md.

    ddp-train submit --config configs/gpu_4x32_resnet50.yaml --nodes 2 --gpus 4 --time 2-00:00:00 \\
        --partition gpu --sweep optim.lr=1e-3,3e-3 data.shards=/shared/imagenet
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional

from .bundled import template
from .config import ConfigError, load_config
from .config.load import resolve_config_path

BODY_MARKER = "# ---- body: `ddp-train submit` copies the script from this line on ----"


class SubmitError(Exception):
    """A problem with the submission itself (no template, sbatch missing or refusing)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line of ``ddp-train submit``."""
    p = argparse.ArgumentParser(prog="ddp-train submit",
                                description="Render an sbatch script for a config and submit it "
                                            "to Slurm (docs/slurm.md).")
    p.add_argument("--config", metavar="FILE|NAME",
                   help="YAML config file or bundled config name (default: the bundled demo)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus", type=int, default=1,
                   help="GPUs per node, one rank each (0 = CPU only; default 1)")
    p.add_argument("--ranks-per-node", type=int, default=0,
                   help="processes per node (default: --gpus, or 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=0,
                   help="CPU cores per node for the ranks and their loader workers "
                        "(default: the partition's default)")
    p.add_argument("--time", default="24:00:00", help="time limit per (re)run (default 24:00:00)")
    p.add_argument("--partition", default="", help="Slurm partition")
    p.add_argument("--account", default="", help="Slurm account")
    p.add_argument("--job-name", default="", help="job name (default: run.name)")
    p.add_argument("--signal-before", type=int, default=300, metavar="SECONDS",
                   help="USR1 this long before the time limit: finish the step, checkpoint, "
                        "requeue (default 300)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one array task per value; several --sweep give every combination")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH option, e.g. --sbatch-option=--qos=high (repeatable)")
    p.add_argument("--out", default="", help="where to write the script "
                   "(default <run.dir>/slurm/<job name>-<stamp>.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_intermixed_args(argv)


def add_array_options(group: argparse._ArgumentGroup, unit: str, gpus_default: str) -> None:
    """The Slurm options of the commands that submit arrays of ddp-train jobs (``sweep --slurm``,
    ``cv --slurm``); ``unit`` names what one array task is ("worker", "fold")."""
    group.add_argument("--gpus", type=int, default=-1,
                       help=f"GPUs per {unit} (default: {gpus_default}; 0 = CPU)")
    group.add_argument("--cpus-per-task", type=int, default=0, help=f"CPU cores per {unit}")
    group.add_argument("--time", default="24:00:00", help="time limit per (re)run")
    group.add_argument("--partition", default="", help="Slurm partition")
    group.add_argument("--account", default="", help="Slurm account")
    group.add_argument("--signal-before", type=int, default=300, metavar="SECONDS",
                       help="USR1 this long before the time limit (default 300)")
    group.add_argument("--sbatch-option", action="append", default=[], metavar="OPTION",
                       help="extra #SBATCH option (repeatable)")
    group.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def split_values(text: str) -> list[str]:
    """``a,b,[1,2]`` -> ``['a', 'b', '[1,2]']``: commas inside brackets belong to a value."""
    values, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def sweep_combinations(sweeps: list[str]) -> list[list[str]]:
    """``['optim.lr=1,2', 'seed=0,1']`` -> every combination as override lists (4 here)."""
    axes = []
    for sweep in sweeps:
        key, sep, values = sweep.partition("=")
        if not sep or not key.strip() or not values:
            raise ConfigError(f"--sweep {sweep!r}: expected KEY=V1,V2,...")
        axes.append([f"{key.strip()}={v}" for v in split_values(values)])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def template_body(nodes: int) -> tuple[str, str]:
    """(template name, its body from the marker line on) for a job on ``nodes`` nodes."""
    name = "train.sbatch" if nodes == 1 else "train_multinode.sbatch"
    try:
        text = template(name)
    except OSError as e:
        raise SubmitError(f"cannot read the sbatch template: {e}") from None
    if BODY_MARKER not in text:
        raise SubmitError(f"slurm/{name}: marker line {BODY_MARKER!r} is missing")
    return name, text[text.index(BODY_MARKER):]


def render(args: argparse.Namespace, run_dir: str, run_name: str,
           combos: list[list[str]]) -> str:
    """The complete sbatch script for these options (see the module docstring)."""
    job_name = args.job_name or run_name
    template_name, body = template_body(args.nodes)
    ranks = args.ranks_per_node or max(args.gpus, 1)
    log_dir = os.path.join(run_dir, "slurm")
    array = len(combos) > 1
    sbatch = [f"--job-name={job_name}", f"--nodes={args.nodes}",
              # one torchrun per node; it starts the ranks itself
              "--ntasks-per-node=1"]
    if args.gpus:
        sbatch.append(f"--gpus-per-node={args.gpus}")
    if args.cpus_per_task:
        sbatch.append(f"--cpus-per-task={args.cpus_per_task}")
    sbatch += [f"--time={args.time}", f"--signal=B:USR1@{args.signal_before}", "--requeue",
               "--open-mode=append",
               f"--output={log_dir}/%x-{'%A_%a' if array else '%j'}.out"]
    if args.partition:
        sbatch.append(f"--partition={args.partition}")
    if args.account:
        sbatch.append(f"--account={args.account}")
    if array:
        sbatch.append(f"--array=0-{len(combos) - 1}")
    sbatch += args.sbatch_option
    # A bundled name becomes its file's absolute path: the job runs the same installed package.
    config = os.path.abspath(resolve_config_path(args.config)) if args.config else ""
    lines = ["#!/bin/bash",
             f"# Rendered by `ddp-train submit` on {time.strftime('%Y-%m-%d %H:%M:%S')} from "
             f"slurm/{template_name}.",
             "# Resubmit with `sbatch THIS_FILE`; see docs/slurm.md.",
             *(f"#SBATCH {opt}" for opt in sbatch), "",
             f"export GPUS={ranks}",
             # The job runs the Python (and so the ddp_train) that rendered it.
             f'export TORCHRUN="${{TORCHRUN:-{shlex.quote(sys.executable)} -m '
             'torch.distributed.run}"',
             f"export RUN_ROOT={shlex.quote(run_dir)}  # run folder: <RUN_ROOT>/<job name>-<job id>",
             "set -- " + " ".join(shlex.quote(a) for a in [config, *args.overrides])]
    if array:
        lines.append('case "${SLURM_ARRAY_TASK_ID:-0}" in')
        lines += [f"  {i}) set -- \"$@\" {' '.join(shlex.quote(o) for o in combo)} ;;"
                  for i, combo in enumerate(combos)]
        lines.append("esac")
    return "\n".join(lines) + "\n\n" + body


def submit(path: str) -> str:
    """``sbatch --parsable path``; returns the job id."""
    if not shutil.which("sbatch"):
        raise SubmitError("sbatch not found on PATH (is this a Slurm login node?); the script "
                          f"is at {path}")
    proc = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch {path} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]  # "<id>[;cluster]"


def main(argv: Optional[list[str]] = None) -> int:
    """Validate, render, write and submit; prints the job id (or the script with --dry-run)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.nodes < 1 or args.gpus < 0 or args.ranks_per_node < 0:
            raise ConfigError("--nodes must be >= 1, --gpus and --ranks-per-node >= 0")
        combos = sweep_combinations(args.sweep)
        # Every array task's config must load: a typo would otherwise surface hours later, in
        # the queue, once per task.
        cfg = None
        for combo in combos:
            cfg = load_config(args.config, [*args.overrides, *combo])
        run_dir = os.path.abspath(cfg.run.dir)
        text = render(args, run_dir, cfg.run.name, combos)
        if args.dry_run:
            print(text, end="")
            return 0
        out = args.out or os.path.join(run_dir, "slurm", f"{args.job_name or cfg.run.name}-"
                                       f"{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        # Slurm does not create the log folder: a missing one fails the job without a word.
        os.makedirs(os.path.join(run_dir, "slurm"), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(out, 0o755)
        job_id = submit(out)
    except (ConfigError, SubmitError, OSError) as e:
        print(f"ddp-train submit: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print(job_id)
    task = "_<task>" if len(combos) > 1 else ""
    print(f"script {out}; logs {run_dir}/slurm/; run folder {run_dir}/"
          f"{args.job_name or cfg.run.name}-{job_id}{task}", file=sys.stderr)
    return 0
