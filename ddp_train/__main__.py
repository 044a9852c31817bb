"""``python -m ddp_train`` / ``ddp-train``: train from a YAML config plus dotted overrides.

Works the same under plain python, ``torchrun``, the ``deepspeed`` launcher, ``accelerate launch``
and Slurm's ``srun``. With no ``--config`` it trains the bundled demo (scikit-learn digits, packed
to ``shards/digits`` on first use); ``--config NAME`` loads the bundled ``configs/NAME.yaml``.
The first argument may instead name a subcommand from :data:`SUBCOMMANDS` (``submit``, ``eval``,
``predict``, ``export``, ``export-weights``, ``cv``, ``sweep``), listed by ``ddp-train --help``.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import json
import signal
import sys
from typing import Callable

from .config import ConfigError, annotated_yaml, load_config


def _module(name: str):
    # Subcommands import lazily: `ddp-train --help` and config errors stay fast (no torch).
    return importlib.import_module(f".{name}", __package__)


# name -> (one-line description for --help, entry point taking the arguments after the name).
# This table is both the --help listing and the dispatch: a new subcommand is one line here.
SUBCOMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "submit": ("render an sbatch script for a config and submit it to Slurm",
               lambda argv: _module("submit").main(argv)),
    "eval": ("evaluate a checkpoint on a split of packed shards",
             lambda argv: _module("infer_cli").main("eval", argv)),
    "predict": ("classify images, folders or a shard split with a checkpoint",
                lambda argv: _module("infer_cli").main("predict", argv)),
    "export": ("write a deployable model: ONNX, TorchScript or timm weights, plus its "
               "inference JSON",
               lambda argv: _module("export").main(argv)),
    "export-weights": ("the same as export --format timm (a timm-loadable weights file)",
                       lambda argv: _module("export").main(["--format", "timm", *argv],
                                                          prog="ddp-train export-weights")),
    "cv": ("k-fold cross-validation: train every fold, write out-of-fold predictions, the "
           "fold ensemble's test metrics and a report",
           lambda argv: _module("cv").main(argv)),
    "sweep": ("tune hyperparameters: an Optuna study of ddp-train runs (needs [sweep])",
              lambda argv: _module("sweep.cli").main(argv)),
}


def _subcommand_help() -> str:
    width = max(map(len, SUBCOMMANDS)) + 2
    rows = "\n".join(f"  {name:<{width}}{text}" for name, (text, _) in SUBCOMMANDS.items())
    return ("subcommands (ddp-train <subcommand> --help for its options):\n" + rows + "\n\n"
            "data and plots (their own commands, each with --help):\n"
            "  ddp-shards pack|index|info|verify   pack images into shards, or index shards "
            "another tool wrote\n"
            "  ddp-plot / plot_training_curve.py   loss curves and a report from run logs\n\n"
            "Examples:\n"
            "  ddp-train                                   train the bundled demo (digits)\n"
            "  ddp-train --config digits --print-config    show a bundled config, resolved\n"
            "  torchrun --nproc_per_node=4 -m ddp_train --config my.yaml train.epochs=30\n"
            "  ddp-train submit --config my.yaml --gpus 4 --dry-run")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Training command line: ``[--config FILE|NAME] [--resume auto|PATH] [--print-config]
    [key=value ...]``; ``--help`` also lists :data:`SUBCOMMANDS`."""
    p = argparse.ArgumentParser(
        prog="ddp-train",
        description="Train a timm image classifier from a YAML config plus dotted overrides.",
        usage="%(prog)s [-h] [--config FILE|NAME] [--resume auto|PATH] [--print-config] "
              "[key=value ...]\n       %(prog)s <subcommand> [...]",
        epilog=_subcommand_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE|NAME",
                   help="YAML config file, or the name of a bundled config (e.g. digits; "
                        "default: the bundled demo)")
    p.add_argument("--resume", metavar="auto|PATH", help="'auto' (newest loadable checkpoint) or "
                   "a checkpoint path; same as run.resume=...")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults + file + overrides) and exit")
    # The deepspeed launcher appends --local_rank=N; the rank comes from the environment it also
    # sets (dist.py reads LOCAL_RANK), so the flag is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.batch_size=64 optim.lr=3e-4")
    return p.parse_intermixed_args(argv)  # options may sit between overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code.

    0 finished; 2 configuration error; 3 diverged (non-finite steps); 128+N stopped by signal N
    after writing a checkpoint (143 SIGTERM, 138 SIGUSR1, 130 SIGINT); 124 watchdog (hang).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]][1](argv[1:])
    if argv and "=" not in argv[0] and not argv[0].startswith("-"):
        close = difflib.get_close_matches(argv[0], list(SUBCOMMANDS), n=1)
        if close:  # checked first: its options would otherwise fail as unknown training options
            print(f"ddp-train: error: unknown subcommand {argv[0]!r} (did you mean {close[0]!r}? "
                  "ddp-train --help lists them)", file=sys.stderr)
            return 2
    args = parse_args(argv)
    # JSON-quote the path so YAML reads it as a string whatever it looks like ("yes", "1").
    resume = [f"run.resume={json.dumps(args.resume)}"] if args.resume else []
    try:
        cfg = load_config(args.config, list(args.overrides) + resume)
    except ConfigError as e:
        from .dist import launch_env  # torch is imported only past this point

        if launch_env()["rank"] == 0:  # one line per job, not one per rank
            print(f"ddp-train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(annotated_yaml(cfg), end="")
        return 0
    from . import dist as distributed
    from .demo import DEFAULT_ROOT, ensure_digits
    from .trainer import DivergedError, train

    # A collective that waits for a hung peer should outlast the watchdog, which ends that
    # peer with a stack dump (the informative failure) and lets the launcher restart the job.
    timeout_s = cfg.engine.timeout_s
    if cfg.watchdog.timeout:
        timeout_s = max(timeout_s, cfg.watchdog.timeout + 60)
    info = None
    try:
        info = distributed.setup(cfg.engine.device, cfg.engine.backend, timeout_s)
        if cfg.data.shards == DEFAULT_ROOT:
            ensure_digits(cfg.data.shards, info)
        result = train(cfg, info)
        if result["signal"]:
            # Stopping already: a second TERM (Slurm signals every process of the step, and
            # torchrun or a sweep worker passes its own on) must not kill this process during
            # teardown and turn "checkpointed, exit 143" into a death by signal.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
    except (ConfigError, DivergedError) as e:
        if info is None or info.is_main:
            print(f"ddp-train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 3
    finally:
        if info is not None:
            distributed.teardown(info)
    if result["signal"]:  # checkpointed and stopped early: exit as a process killed by it would
        return 128 + result["signal"]
    if result["diverged"]:
        if info.is_main:
            print(f"ddp-train: error: {result['stop_reason']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
