"""Engine benchmark: steps/s of DDP vs DeepSpeed ZeRO-0 and ZeRO-2 on the same model, 2 CPU ranks.

Full run (about 2.5 minutes on the 2-core shared VM: 159 s measured)::

    .venv/bin/python bench/engines.py

Smoke run::

    .venv/bin/python bench/engines.py --quick

The script launches itself under ``python -m torch.distributed.run --nproc_per_node=2
--standalone`` (gloo, OMP_NUM_THREADS=1). Inside that one job it builds the three engines once
(the same timm model from the same seed, ddp-train's AdamW, fp32, grad_accum 1) and alternates
them for ``--rounds`` rounds, order rotated each round: one segment of ``--steps`` timed
micro-batches (the trainer's to_device / autocast / backward / step calls) per engine per
round, after an untimed warm-up segment. In-memory random batches: no loader work is timed.
Reported: median steps/s per engine and its ratio to DDP's median of this same run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"ddp": ("ddp", {}),
            "zero0": ("deepspeed", {"zero_optimization": {"stage": 0}}),
            "zero2": ("deepspeed", {"zero_optimization": {"stage": 2}})}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=8, help="timed steps per segment")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 rounds of 3 steps")
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 3
    return args


def worker(args: argparse.Namespace) -> None:
    import timm
    import torch
    import torch.nn.functional as F

    from ddp_train.config import EngineConfig, OptimConfig
    from ddp_train.dist import setup, teardown
    from ddp_train.engine import build_engine
    from ddp_train.optim import build_optimizer

    dist = setup(device="cpu", backend="gloo")
    engines = {}
    for name, (engine_name, block) in VARIANTS.items():
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10)
        engines[name] = build_engine(EngineConfig(name=engine_name, deepspeed=block), model,
                                     build_optimizer(OptimConfig(), model), dist,
                                     batch_size=args.batch)
    g = torch.Generator().manual_seed(dist.rank)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)

    def segment(engine, steps: int) -> float:
        torch.distributed.barrier()  # every rank starts the segment together
        t0 = time.perf_counter()
        for _ in range(steps):
            with engine.autocast():
                loss = F.cross_entropy(engine.model(engine.to_device(x)), y)
            engine.backward(loss)
            engine.step()
        return steps / (time.perf_counter() - t0)

    for engine in engines.values():
        segment(engine, 2)  # warm-up: allocator, DeepSpeed's first-step buffers
    rates: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            rates[name].append(segment(engines[name], args.steps))
    if dist.is_main:
        ddp = statistics.median(rates["ddp"])
        result = {name: {"median_steps_per_s": statistics.median(v),
                         "ratio_vs_ddp": statistics.median(v) / ddp, "rounds": v}
                  for name, v in rates.items()}
        print(json.dumps({"model": args.model, "image_size": args.image_size,
                          "batch_per_rank": args.batch, "world_size": dist.world_size,
                          "steps": args.steps, "rounds": args.rounds, "results": result}))
        print(f"{'engine':8} {'steps/s':>8} {'vs ddp':>7}")
        for name, res in result.items():
            print(f"{name:8} {res['median_steps_per_s']:8.3f} {res['ratio_vs_ddp']:7.3f}")
    teardown(dist)


def main() -> int:
    args = parse_args()
    if "RANK" in os.environ:
        worker(args)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.abspath(__file__), *sys.argv[1:]]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:] + proc.stderr[-3000:], file=sys.stderr)
        return proc.returncode or 1
    print("\n".join(lines[1:]))
    if args.json:
        with open(args.json, "w") as f:
            f.write(lines[0] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
