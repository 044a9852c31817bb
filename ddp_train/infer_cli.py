"""``ddp-train eval`` and ``ddp-train predict``: the command lines over :mod:`ddp_train.infer`
(one checkpoint) and :mod:`ddp_train.ensemble` (``--ensemble A B C``).

Kept apart from both so the ensemble module may build on :mod:`ddp_train.infer` without the
single-model module importing it back.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import ensemble, infer


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="run folder, .pt checkpoint, DeepSpeed "
                   "checkpoint folder or export-weights file")
    p.add_argument("--ensemble", nargs="+", metavar="CHECKPOINT", help="instead of CHECKPOINT: "
                   "average these checkpoints' probabilities (see docs/inference.md)")
    p.add_argument("--weights", default="", help="--ensemble member weights, comma-separated "
                   "(normalised to sum 1; default equal)")
    p.add_argument("--members", action="store_true", help="--ensemble: also show each "
                   "member's vote (predict) or metrics (eval)")
    p.add_argument("--tta", action="store_true", help="average logits over the checkpoint "
                   "config's tta views (hflip, scales)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward (default 64)")


def main(command: str, argv: list[str]) -> int:
    """``eval`` / ``predict`` entry point; one-line errors, exit 2."""
    p = argparse.ArgumentParser(prog=f"ddp-train {command}",
                                description=infer.__doc__.splitlines()[0])
    _common(p)
    p.add_argument("--split", default="test", help="split of --shards (default test)")
    if command == "eval":
        p.add_argument("--shards", required=True, help="packed dataset folder (_info.json)")
        p.add_argument("--out", default="", help="also write the metrics as JSON here")
        p.add_argument("--workers", type=int, default=2, help="loader worker processes")
        p.add_argument("--fit-temperature", metavar="SPLIT", default="",
                       help="fit the temperature on SPLIT (e.g. val) instead of the stored one")
        p.add_argument("--no-temperature", action="store_true", help="ignore the stored one")
    else:
        p.add_argument("images", nargs="*", help="image files or folders (or use --shards)")
        p.add_argument("--shards", default="", help="predict every sample of --split instead")
        p.add_argument("--out", default="-", help="CSV file (default: standard output)")
    args = p.parse_args(argv)
    try:
        if args.ensemble:
            return ensemble.run_command(command, args)
        if args.checkpoint is None:
            raise infer.InferenceError("give a CHECKPOINT or --ensemble CHECKPOINT...")
        if args.weights or args.members:
            raise infer.InferenceError("--weights and --members go with --ensemble")
        if command == "eval":
            metrics = infer.evaluate_checkpoint(args.checkpoint, args.shards, split=args.split,
                                                tta=args.tta, fit_split=args.fit_temperature,
                                                use_temperature=not args.no_temperature,
                                                device=args.device, batch_size=args.batch_size,
                                                workers=args.workers)
            print(infer.format_metrics(metrics))
            if args.out:
                with open(args.out, "w", encoding="utf-8") as f:
                    json.dump(metrics, f, indent=1)
            return 0
        if bool(args.images) == bool(args.shards):
            raise infer.InferenceError("give image files/folders or --shards DIR (one of them)")
        rows = infer.predict(args.checkpoint, args.images, shards=args.shards,
                             split=args.split, out=args.out, tta=args.tta, device=args.device,
                             batch_size=args.batch_size)
        if args.out != "-":
            print(f"wrote {rows} predictions to {args.out}", file=sys.stderr)
        return 0
    except (infer.InferenceError, OSError) as e:
        print(f"ddp-train {command}: error: {e}", file=sys.stderr)
        return 2
