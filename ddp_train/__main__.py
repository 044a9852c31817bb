"""``python -m ddp_train`` / ``ddp-train``: train from a YAML config plus dotted overrides.

Works the same under plain python, ``torchrun``, the ``deepspeed`` launcher, ``accelerate launch``
and Slurm's ``srun``. With no ``--config`` it trains the bundled demo (scikit-learn digits, packed
to ``shards/digits`` on first use). ``export-weights RUN`` writes a timm-loadable weights file
(see :mod:`ddp_train.export`); ``submit`` renders and submits a Slurm job (see
:mod:`ddp_train.submit`); ``eval CHECKPOINT --shards DIR`` and ``predict CHECKPOINT
IMAGES...`` run a checkpoint on one GPU or the CPU (see :mod:`ddp_train.infer`).
"""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, annotated_yaml, load_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line: ``[--config FILE] [--resume auto|PATH] [--print-config] [key=value ...]``."""
    p = argparse.ArgumentParser(prog="ddp-train", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML config file (default: the bundled demo)")
    p.add_argument("--resume", help="'auto' (newest loadable checkpoint) or a checkpoint path; "
                   "same as run.resume=...")
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
    if argv[:1] == ["export-weights"]:
        from .export import main as export_main

        return export_main(argv[1:])
    if argv[:1] == ["submit"]:
        from .submit import main as submit_main

        return submit_main(argv[1:])
    if argv[:1] in (["eval"], ["predict"]):
        from .infer import main as infer_main

        return infer_main(argv[0], argv[1:])
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
