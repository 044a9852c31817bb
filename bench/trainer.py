"""Trainer benchmark: ddp-train's training loop vs a minimal hand-written DDP loop, 2 CPU ranks.

Full run (about 2.5 minutes on the 2-core shared VM: 133-145 s measured)::

    .venv/bin/python bench/trainer.py

Smoke run (< 60 s, one round of a few steps)::

    .venv/bin/python bench/trainer.py --quick

The script launches itself under ``python -m torch.distributed.run --nproc_per_node=2
--standalone`` (gloo, OMP_NUM_THREADS=1) and, inside that one job, alternates three variants
for ``--rounds`` rounds (order rotated each round, so drift and position effects cancel):

  hand       DDP(model), torch AdamW, cross-entropy, zero_grad/backward/step; nothing else,
  ddp-train  a real ``Trainer`` built from a Config, its ``fit()`` loop, per-step logging on,
  no-log     the same with ``trainer.log`` replaced by ``NullLogger()``.

All three train the same timm model (resnet10t, 10 classes, 32 px, batch 32 per rank: the
bundled demo's model and size) on **in-memory data**, a fixed list of random batches, so no
loader or disk work is timed. Each variant is built once (the Trainers on tiny real shards,
which they need for a manifest) and then runs one segment of ``--warmup`` + ``--steps`` steps
per round: ``fit()`` is re-run from step 0 with its ``train_loader`` swapped for
:class:`MemoryLoader`, which stamps the time each batch is handed out. Steps/s = timed steps /
time between the first and last timed stamp. An untimed segment per variant comes first.

Reported: medians over rounds, and ratios of medians against the hand loop of this same run.
On a shared 2-core VM the wall-clock rows carry several % of noise, so two steadier views are
added: rank 0's CPU-seconds per step (``time.process_time``, all threads), and the logging cost
measured directly as the time spent inside ``RunLogger.log_step`` per step.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Callable

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmark runs from a checkout, not an installed package

NUM_CLASSES = 10
VARIANTS = ("hand", "ddp-train", "no-log")


# ----------------------------------------------------------------------------- set-up (launcher)

def write_tiny_shards(root: str, num_samples: int) -> None:
    """One train shard of ``num_samples`` tiny PNGs (10 classes) plus its ``_info.json``.

    Only construction reads it: ``Trainer`` loads the manifest and builds its real train loader,
    whose length is the epoch length ``fit()`` plans with. Sized to one segment, it makes each
    segment exactly one epoch, whose end-of-run checkpoint falls after the last timed stamp.
    Written with plain ``tarfile`` (members ``<key>.png`` and ``<key>.cls``, the WebDataset
    layout): webdataset would import torch, seconds of start-up the launcher does not need.
    """
    from PIL import Image

    from ddp_train.shards.manifest import Manifest, SplitInfo, write_manifest

    os.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    with tarfile.open(os.path.join(root, "train-000000.tar"), "w") as tar:
        for i in range(num_samples):
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % NUM_CLASSES).encode())):
                member = tarfile.TarInfo(f"s{i:06d}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    split = SplitInfo("train", num_samples, ["train-000000.tar"], [num_samples])
    write_manifest(Manifest(root=root, classes=[f"c{k}" for k in range(NUM_CLASSES)],
                            splits={"train": split}), root)


def launch(args: argparse.Namespace) -> dict:
    """Run this script under torchrun with 2 ranks; return rank 0's results."""
    workdir = tempfile.mkdtemp(prefix="ddp-train-bench-trainer-", dir=args.workdir)
    try:
        shards = os.path.join(workdir, "shards")
        steps = args.warmup + args.steps + 1  # +1: the last step has no following stamp
        write_tiny_shards(shards, 2 * args.batch * steps)
        out = os.path.join(workdir, "results.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--standalone", os.path.abspath(__file__), "--shards", shards, "--out", out,
               "--workdir", workdir, *forwarded(args)]
        # One thread per rank: 2 ranks on 2 cores; more would only oversubscribe the CPU.
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        log_path = os.path.join(args.workdir, "bench-trainer-torchrun.log")
        print(f"torchrun job running; its full output goes to {log_path}", flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, cwd=ROOT, text=True)
            for line in proc.stdout:  # all to the log; the per-round lines to the console too
                log.write(line)
                if line.startswith("round "):
                    print(line, end="", flush=True)
            proc.wait()
        if proc.returncode != 0:
            with open(log_path) as log:
                sys.exit(f"torchrun failed ({proc.returncode}):\n{log.read()[-4000:]}")
        with open(out) as f:
            return json.load(f)
    finally:  # shards, run folders and their last.pt files (the log stays next to it)
        shutil.rmtree(workdir, ignore_errors=True)


def forwarded(args: argparse.Namespace) -> list[str]:
    """The measurement flags, passed on to the ranks."""
    return ["--model", args.model, "--image-size", str(args.image_size), "--batch",
            str(args.batch), "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--rounds", str(args.rounds), *(["--quick"] if args.quick else [])]


# ----------------------------------------------------------------------------- the ranks

class MemoryLoader:
    """Stands in for ``ShardLoader`` with the interface ``Trainer.fit`` uses.

    Yields batches from a fixed in-memory list and records ``time.perf_counter()`` (wall) and
    ``time.process_time()`` (this process's CPU, all threads) as each batch is handed out: the
    gap between two stamps is one full training step of the caller. Read-only metadata the loop
    may log (``num_samples``, ``split``, ...) comes from ``real``, the loader it replaces.
    """

    def __init__(self, batches: list, length: int, real: object = None) -> None:
        self.batches, self.length, self.real = batches, length, real
        self.epoch = 0
        self.consumed = 0
        self.stamps: list[float] = []
        self.cpu_stamps: list[float] = []

    def __len__(self) -> int:
        return self.length

    def __getattr__(self, name: str):
        # Only called for attributes not defined here: position and iteration stay ours.
        if self.real is None:
            raise AttributeError(name)
        return getattr(self.real, name)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed = epoch, 0

    def __iter__(self):
        while self.consumed < self.length:
            batch = self.batches[self.consumed % len(self.batches)]
            self.stamps.append(time.perf_counter())
            self.cpu_stamps.append(time.process_time())
            self.consumed += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["batches"])


def per_step(stamps: list[float], warmup: int) -> float:
    """Seconds per step over the steps after ``warmup`` (the last stamp closes the last one)."""
    return (stamps[-1] - stamps[warmup]) / (len(stamps) - 1 - warmup)


def make_batches(args: argparse.Namespace, rank: int) -> list:
    """A few fixed random batches per rank (different per rank, as real data would be)."""
    import torch

    g = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
             torch.randint(0, NUM_CLASSES, (args.batch,), generator=g)) for _ in range(4)]


class HandLoop:
    """The minimal DDP loop: the reference everything is compared with."""

    def __init__(self, args: argparse.Namespace, cfg, batches: list) -> None:
        import timm
        import torch
        from torch.nn.parallel import DistributedDataParallel

        torch.manual_seed(cfg.seed)
        self.model = DistributedDataParallel(timm.create_model(args.model,
                                                               num_classes=NUM_CLASSES))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.optim.lr,
                                     weight_decay=cfg.optim.weight_decay)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.batches = batches

    def segment(self, length: int) -> MemoryLoader:
        """Train ``length`` steps; return the stamped loader."""
        loader = MemoryLoader(self.batches, length)
        for images, labels in loader:
            self.opt.zero_grad()
            loss = self.criterion(self.model(images), labels)
            loss.backward()
            self.opt.step()
        return loader

    def close(self) -> None:
        """Nothing to release."""


class DdpTrainLoop:
    """A real ``Trainer`` (built once) whose ``fit()`` is re-run on in-memory batches."""

    def __init__(self, cfg, dist, batches: list, logging: bool) -> None:
        from ddp_train.runlog import NullLogger
        from ddp_train.trainer import Trainer

        self.trainer = Trainer(cfg, dist)
        self.batches, self.dist = batches, dist
        # The real loader's length is the epoch length fit() plans with; the stand-in matches it.
        self.real = self.trainer.train_loader
        self.length = len(self.real)
        if not logging:  # "logging off" = what ranks other than 0 always run with
            self.trainer.log.close()
            self.trainer.log = NullLogger()
        self._log_s = [0.0]
        self.trainer.log.log_step = timed(self.trainer.log.log_step, self._log_s)

    @property
    def log_s(self) -> float:
        """Seconds spent inside ``log.log_step`` during the last segment."""
        return self._log_s[0]

    def segment(self, length: int) -> MemoryLoader:
        """Run ``fit()`` from step 0 over a fresh stand-in loader; return it, stamped."""
        from ddp_train.trainer import Progress

        assert length == self.length, "the shards were sized for this many steps"
        # Re-running fit() on the same Trainer: reset its position, keep model and optimizer
        # (as the hand loop does), so no construction happens between the timed segments.
        self.trainer.progress = Progress()
        self.trainer.train_loader = loader = MemoryLoader(self.batches, length, self.real)
        self._log_s[0] = 0.0
        self.trainer.fit()  # ends with a last.pt (untimed: after the last stamp)
        return loader

    def close(self) -> None:
        """Close the logger; rank 0 removes the run folder (it holds a ~60 MB last.pt)."""
        self.trainer.log.close()
        if self.dist.is_main:
            shutil.rmtree(self.trainer.run_dir, ignore_errors=True)


def timed(fn: Callable, total: list[float]) -> Callable:
    """``fn`` that adds its own run time to ``total[0]`` (a ~1 us wrapper)."""
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            total[0] += time.perf_counter() - t0
    return wrapper


def rank_main(args: argparse.Namespace) -> None:
    """One rank of the torchrun job: alternate the variants; rank 0 writes the results."""
    import torch

    from ddp_train.config import load_config
    from ddp_train.dist import barrier, setup, teardown

    torch.set_num_threads(1)
    dist = setup(device="cpu", backend="gloo")
    steps = args.warmup + args.steps + 1
    cfg = load_config(None, [
        f"data.shards={args.shards}", f"data.image_size={args.image_size}",
        "data.num_workers=0", "data.val_split=", "data.test_split=",
        "eval.every_epoch=false", "eval.test_at_end=false", "checkpoint.every_steps=0",
        f"model.name={args.model}", f"train.batch_size={args.batch}", "train.epochs=1",
        f"train.max_steps={steps}", f"run.dir={os.path.join(args.workdir, 'runs')}",
        "run.name=bench", "engine.device=cpu", "engine.backend=gloo"])
    batches = make_batches(args, dist.rank)
    loops = {"hand": HandLoop(args, cfg, batches),
             "ddp-train": DdpTrainLoop(cfg, dist, batches, logging=True),
             "no-log": DdpTrainLoop(cfg, dist, batches, logging=False)}
    if not args.quick:  # smoke runs skip it
        for loop in loops.values():  # untimed: first-use costs (allocator, DDP bucket rebuild)
            barrier(dist)
            loop.segment(steps)
    rates: dict[str, list[float]] = {v: [] for v in VARIANTS}  # steps/s (wall)
    cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}  # rank 0 CPU-seconds per step
    log_fraction: list[float] = []  # share of a step spent inside log_step (logging on)
    log_ms: list[float] = []  # milliseconds inside log_step per step (logging on)
    for r in range(args.rounds):
        # Rotating the order (a-b-c, b-c-a, c-a-b, ...) cancels any "runs second" effect.
        for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            barrier(dist)
            loader = loops[variant].segment(steps)
            step_s = per_step(loader.stamps, args.warmup)
            rates[variant].append(1 / step_s)
            cpu[variant].append(per_step(loader.cpu_stamps, args.warmup))
            if variant == "ddp-train":
                per_call = loops[variant].log_s / len(loader.stamps)  # one call per step
                log_fraction.append(per_call / step_s)
                log_ms.append(per_call * 1000)
        if dist.is_main:
            print(f"round {r + 1}: " + "  ".join(f"{v} {rates[v][-1]:.3f}" for v in VARIANTS)
                  + " steps/s", flush=True)
    for loop in loops.values():
        loop.close()
    if dist.is_main:
        with open(args.out, "w") as f:
            json.dump({"rates": rates, "cpu": cpu, "log_fraction": log_fraction,
                       "log_ms": log_ms}, f)
    barrier(dist)
    teardown(dist)


# ----------------------------------------------------------------------------- report

def report(res: dict, args: argparse.Namespace) -> None:
    """Medians, ratios against the hand loop, and PASS/MISS per target."""
    rates, cpu = res["rates"], res["cpu"]
    med = {v: statistics.median(rates[v]) for v in VARIANTS}
    cpu_med = {v: statistics.median(cpu[v]) for v in VARIANTS}
    print(f"\n{args.model} @ {args.image_size} px, batch {args.batch}/rank, 2 ranks (gloo), "
          f"{args.steps} timed steps after {args.warmup} warm-up, {args.rounds} rounds")
    print(f"{'variant':12s}{'steps/s median':>16s}{'(min-max)':>16s}{'s/step':>9s}"
          f"{'vs hand':>9s}{'CPU s/step':>12s}{'vs hand':>9s}")
    for v in VARIANTS:
        spread = f"({min(rates[v]):.3f}-{max(rates[v]):.3f})"
        print(f"{v:12s}{med[v]:16.3f}{spread:>16s}{1 / med[v]:9.3f}{med[v] / med['hand']:9.3f}"
              f"{cpu_med[v]:12.3f}{cpu_med['hand'] / cpu_med[v]:9.3f}")
    speed = med["ddp-train"] / med["hand"]
    cost_ab = 1 - med["ddp-train"] / med["no-log"]  # share of throughput lost to logging
    cost_direct = statistics.median(res["log_fraction"])
    cpu_speed = cpu_med["hand"] / cpu_med["ddp-train"]
    cpu_cost = 1 - cpu_med["no-log"] / cpu_med["ddp-train"]
    rows = [("ddp-train vs hand loop (steps/s)", f"{speed:.3f}", ">= 0.97", speed >= 0.97),
            ("logging cost, A/B (1 - on/off)", f"{cost_ab:+.1%}", "<= 1%", cost_ab <= 0.01),
            ("logging cost, time in log_step", f"{cost_direct:.2%}", "<= 1%",
             cost_direct <= 0.01),
            ("CPU view: hand / ddp-train CPU per step", f"{cpu_speed:.3f}", ">= 0.97",
             cpu_speed >= 0.97),
            ("CPU view: logging cost (1 - off/on)", f"{cpu_cost:+.1%}", "<= 1%", cpu_cost <= 0.01)]
    print(f"time inside RunLogger.log_step: {statistics.median(res['log_ms']):.3f} ms per step "
          "(median)")
    print(f"\n{'comparison (ratios of medians)':40s}{'value':>9s}{'target':>10s}  result")
    for name, value, target, ok in rows:
        print(f"{name:40s}{value:>9s}{target:>10s}  {'PASS' if ok else 'MISS'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank per step")
    # Many short segments rather than a few long ones: bursts of other jobs then spoil a few
    # samples of the median instead of a large share of one variant's time.
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per segment")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per segment")
    parser.add_argument("--rounds", type=int, default=16, help="rounds of the 3 variants")
    # tmpfs by default: every fit() ends with a ~60 MB last.pt, and disk write-back of it would
    # run during the next timed segment.
    parser.add_argument("--workdir",
                        default="/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir(),
                        help="where the temporary shards, runs and the torchrun log go")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 1+2 steps, no untimed segment")
    parser.add_argument("--shards", help=argparse.SUPPRESS)  # set by the launcher for the ranks
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.warmup, args.steps = 1, 1, 2
    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        rank_main(args)
        return
    t0 = time.perf_counter()
    # The version from the package metadata: importing torch here would only delay the ranks.
    print(f"torch {importlib.metadata.version('torch')} | {os.cpu_count()} CPUs | load avg "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    res = launch(args)
    report(res, args)
    print(f"\nload avg at the end {os.getloadavg()[0]:.2f} | total "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
