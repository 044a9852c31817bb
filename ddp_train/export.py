"""``ddp-train export-weights RUN``: a plain timm-loadable state dict from any checkpoint.

RUN is a run folder (its ``checkpoints/last``) or a checkpoint: a ``.pt`` file (local/DDP) or a
DeepSpeed checkpoint folder, whose ZeRO partitions are consolidated into fp32. The output is
written atomically as ``{"model": state_dict}`` with a JSON sidecar, so
``timm.create_model(name, num_classes=N, checkpoint_path=OUT)`` loads it.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import checkpoint as ckpt


def export_weights(run: str, out: str = "") -> str:
    """Write the model weights of ``run``'s checkpoint to ``out`` (default: next to it)."""
    path = ckpt.find_checkpoint(run)
    weights = ckpt.read_weights(path)
    out = out or os.path.splitext(path.rstrip("/"))[0] + ".weights.pt"
    meta = {k: v for k, v in (ckpt.read_meta(path) or {}).items()
            if k in ("model_name", "num_classes", "classes", "image_size", "step", "epoch",
                     "config_hash", "engine", "temperature", "inputs", "config")}
    ckpt.save_atomic(out, {"model": weights}, {**meta, "exported_from": os.path.abspath(path)})
    return out


def main(argv: list[str]) -> int:
    """``export-weights RUN [--out FILE]``; prints the written path."""
    p = argparse.ArgumentParser(prog="ddp-train export-weights", description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder, checkpoint .pt file or DeepSpeed checkpoint folder")
    p.add_argument("--out", default="", help="output .pt (default: <checkpoint>.weights.pt)")
    args = p.parse_args(argv)
    try:
        print(export_weights(args.run, args.out))
    except (FileNotFoundError, ckpt.CheckpointError) as e:
        print(f"ddp-train export-weights: error: {e}", file=sys.stderr)
        return 2
    return 0
