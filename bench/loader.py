"""Loader benchmark: ddp-train's shard stream vs a bare decode loop vs torchvision ImageFolder.

Full run (~40 s on a 2-vCPU VM; the first run also writes and packs the images into
``--workdir``: 3.5 minutes in all under a load average of 5)::

    .venv/bin/python bench/loader.py

Smoke run (< 60 s, 1,000 images, one round)::

    .venv/bin/python bench/loader.py --quick

On the same synthetic JPEGs (10 classes, 96-160 px, cached under ``--workdir``) and the same
transform (``build_transform(DataConfig(image_size=64), train=True)``) it measures images/s of

  (a) a bare single-process loop: read file -> PIL decode -> transform (= one worker),
  (b) torchvision ``ImageFolder`` + ``DataLoader`` (``--workers`` workers, batch 32),
  (c) ddp-train's shard stream, ``build_loader(..., train=True)`` (same workers, batch 32),

plus the time to the first batch of (b) and (c), and of (c) resumed at 90% of an epoch versus
at 0%. The machine is shared and noisy, and its speed drifts by 10-20% within seconds, so the
variants run interleaved (a-b-c, a-c-b, a-b-c, ...: the order of (b) and (c) alternates;
resume 0%-90%-0%-90%...), and the ratios are paired: each round's (c) is compared with the (a)
and (b) of the same round, and the table gives the median of those per-round ratios.
Throughput is steady state: images after the first batch / time from the first to the last
batch, so worker start-up is counted once, in the time to first batch.

Wall-clock rates on a shared 2-core machine mostly measure the other jobs (two workers need two
free cores), so the table also gives a "CPU view": images per CPU-second of all the processes
of a variant (main process + workers, start-up included): what the pipeline itself costs,
which depends far less on the load. Targets are checked on both; the wall-clock rows are the
issue's.
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import random
import resource
import statistics
import sys
import time
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the benchmark runs from a checkout, not an installed package

from ddp_train.config import DataConfig  # noqa: E402
from ddp_train.data import build_loader, build_transform  # noqa: E402
from ddp_train.dist import DistInfo  # noqa: E402
from ddp_train.shards.pack import pack  # noqa: E402

NUM_CLASSES = 10
IMAGE_SIZE = 64  # model input size fed by the transform


# ----------------------------------------------------------------------------- data set

def synthetic_image(rng: np.random.Generator, label: int) -> Image.Image:
    """A 96-160 px RGB image: class-tinted gradient + noise + a few random shapes.

    Smooth areas plus noise give JPEGs of a realistic size (a few KB), unlike pure noise.
    """
    w, h = (int(v) for v in rng.integers(96, 161, size=2))
    tint = np.array([(label * 37) % 256, (label * 91) % 256, (label * 157) % 256], np.float32)
    ramp = np.linspace(0.3, 1.0, w, dtype=np.float32)[None, :, None]
    pixels = tint * ramp + rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, w - x0)), y0 + int(rng.integers(10, h - y0)))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def write_image(job: tuple[str, int]) -> None:
    """Write image ``index`` (seeded by its index, so any worker count gives the same files)."""
    folder, index = job
    label = index % NUM_CLASSES
    path = os.path.join(folder, f"class_{label}", f"{index:05d}.jpg")
    synthetic_image(np.random.default_rng(index), label).save(path, quality=90)


def write_images(folder: str, count: int) -> None:
    """``folder/class_K/NNNNN.jpg``, written into a temp folder and renamed when complete, so an
    interrupted run never leaves a half-written cache behind."""
    tmp = folder + f".partial-{os.getpid()}"
    for label in range(NUM_CLASSES):
        os.makedirs(os.path.join(tmp, f"class_{label}"), exist_ok=True)
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(write_image, [(tmp, i) for i in range(count)], chunksize=64)
    os.rename(tmp, folder)


def prepare_data(workdir: str, count: int) -> tuple[str, str]:
    """Return (image folder, shard folder) for ``count`` images, creating them once per count."""
    images = os.path.join(workdir, f"images-{count}")
    shards = os.path.join(workdir, f"shards-{count}")
    if not os.path.isdir(images):
        t0 = time.perf_counter()
        write_images(images, count)
        print(f"wrote {count} JPEGs to {images} in {time.perf_counter() - t0:.1f} s", flush=True)
    if not os.path.exists(os.path.join(shards, "_info.json")):
        t0 = time.perf_counter()
        # Everything in train: the benchmark reads one split; shard_size 1000 is the default.
        pack(images, shards, val_fraction=0.0, test_fraction=0.0, progress="none",
             overwrite=True)
        print(f"packed them into {shards} in {time.perf_counter() - t0:.1f} s", flush=True)
    return images, shards


def list_files(images: str) -> list[str]:
    """All JPEG paths under the image folder, in a fixed shuffled order (like a train epoch)."""
    files = [os.path.join(d, f) for d, _, names in os.walk(images) for f in names]
    random.Random(0).shuffle(files)
    return files


# ----------------------------------------------------------------------------- measurements

def cpu_seconds() -> float:
    """User + system CPU time of this process and of its children that have exited.

    Wall-clock rates on a shared machine mostly measure the other jobs; CPU seconds per image
    measure the pipeline's own cost and depend far less on the load.
    """
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bare_loop(files: list[str], transform: Callable) -> tuple[float, float]:
    """(a) (images/s, images per CPU-second) of read + decode + transform in this process."""
    t0, c0 = time.perf_counter(), cpu_seconds()
    for path in files:
        with open(path, "rb") as f:
            data = f.read()
        transform(Image.open(io.BytesIO(data)).convert("RGB"))
    return len(files) / (time.perf_counter() - t0), len(files) / (cpu_seconds() - c0)


def time_batches(batches: Iterable, max_batches: int) -> tuple[float, float, float]:
    """(time to first batch in s, steady-state images/s, images per CPU-second) over at most
    ``max_batches`` batches.

    The clock starts before ``iter()`` so worker start-up lands in the first-batch time; the
    steady rate runs from the first to the last batch received, so worker shutdown is excluded.
    The CPU rate covers everything: start-up, all workers and the main process.
    """
    t0, c0 = time.perf_counter(), cpu_seconds()
    it = iter(batches)
    first, _ = next(it)
    t_first = t_last = time.perf_counter()
    images = 0  # images after the first batch
    for count, (x, _) in enumerate(it, start=2):
        images += len(x)
        t_last = time.perf_counter()
        if count >= max_batches:
            break
    close(it)
    cpu = cpu_seconds() - c0  # workers are joined by now, so their CPU time is counted
    return t_first - t0, images / max(t_last - t_first, 1e-9), (images + len(first)) / cpu


def close(it: object) -> None:
    """Stop a loader iterator's workers now, so they cannot steal CPU from the next variant."""
    if hasattr(it, "close"):  # ShardLoader.__iter__ is a generator owning its DataLoader
        it.close()
    elif hasattr(it, "_shutdown_workers"):  # torch's multi-process DataLoader iterator
        it._shutdown_workers()
    for worker in multiprocessing.active_children():  # reap them: their CPU time is then known
        worker.join()


def torchvision_loader(images: str, transform: Callable, workers: int, batch: int):
    """(b) ImageFolder + DataLoader, shuffled, whole batches only (as ddp-train's train stream)."""
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(images, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True,
                                       num_workers=workers, drop_last=True)


def shard_loader(shards: str, workers: int, batch: int, epoch: int = 0):
    """(c) ddp-train's train loader for one process (rank 0 of 1)."""
    cfg = DataConfig(shards=shards, image_size=IMAGE_SIZE, num_workers=workers)
    loader = build_loader(cfg, DistInfo(), split="train", train=True, batch_size=batch, seed=0)
    loader.set_epoch(epoch)
    return loader


def resumed_first_batch(shards: str, workers: int, batch: int, fraction: float) -> float:
    """Seconds to the first batch of a fresh loader resumed at ``fraction`` of epoch 0."""
    loader = shard_loader(shards, workers, batch)
    state = loader.state_dict()
    state["batches"] = int(fraction * len(loader))
    state["samples"] = state["batches"] * batch
    loader.load_state_dict(state)
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    elapsed = time.perf_counter() - t0
    close(it)
    return elapsed


# ----------------------------------------------------------------------------- report

def verdict(ratio: float, target: float, higher_is_better: bool) -> str:
    ok = ratio >= target if higher_is_better else ratio <= target
    return "PASS" if ok else "MISS"


def spread(values: list[float]) -> str:
    """``median (min-max)`` of a measurement's repeats."""
    return f"{statistics.median(values):8.1f} ({min(values):.1f}-{max(values):.1f})"


def paired(res: dict[str, list[float]], num: str, den: str, scale: float = 1.0) -> list[float]:
    """Per-round ratios ``num / den``: both measured seconds apart, so the drift of the
    machine's speed between rounds cancels (a ratio of medians would mix rounds)."""
    return [n / scale / d for n, d in zip(res[num], res[den])]


def report(res: dict[str, list[float]], workers: int) -> None:
    """Print the medians, the ratios against the in-run baselines, and PASS/MISS per target."""
    med = {k: statistics.median(v) for k, v in res.items()}
    print("\nthroughput, images/s: median (min-max) over rounds")
    print(f"  (a) bare loop, 1 process            {spread(res['a'])}")
    print(f"  (b) torchvision, {workers} workers          {spread(res['b'])}")
    print(f"  (c) ddp-train shards, {workers} workers     {spread(res['c'])}")
    print(f"  (c) per worker (/{workers})               {med['c'] / workers:8.1f}")
    print("\nimages per CPU-second (all processes; much less sensitive to other jobs' load)")
    print(f"  (a) bare loop                        {spread(res['cpu_a'])}")
    print(f"  (b) torchvision                      {spread(res['cpu_b'])}")
    print(f"  (c) ddp-train shards                 {spread(res['cpu_c'])}")
    print("\ntime to first batch, ms: median (min-max)")
    for key, name in (("ttfb_b", "(b) torchvision"), ("ttfb_c", "(c) ddp-train"),
                      ("resume0", "(c) resumed at 0%"), ("resume90", "(c) resumed at 90%")):
        print(f"  {name:36s}{spread([v * 1000 for v in res[key]])}")

    # throughput ratios: median of per-round ratios; first-batch times: ratios of medians (the
    # resume pairs are not rounds)
    rows = [("(c)/worker vs (a) bare loop", paired(res, "c", "a", workers), 0.95, True),
            ("(c) vs (b) torchvision", paired(res, "c", "b"), 1.0, True),
            ("resume@90% vs resume@0% first batch", [med["resume90"] / med["resume0"]], 1.1,
             False),
            ("(c) vs (b) first batch (info)", [med["ttfb_c"] / med["ttfb_b"]], None, False),
            ("CPU view: (c) vs (a) per CPU-second", paired(res, "cpu_c", "cpu_a"), 0.95, True),
            ("CPU view: (c) vs (b) per CPU-second", paired(res, "cpu_c", "cpu_b"), 1.0, True)]
    print(f"\n{'comparison':40s}{'ratio':>8s}{'target':>10s}  result  (min-max over rounds)")
    for name, ratios, target, higher in rows:
        ratio = statistics.median(ratios)
        goal = "" if target is None else (">= " if higher else "<= ") + f"{target:.2f}"
        result = "-" if target is None else verdict(ratio, target, higher)
        span = f"  ({min(ratios):.3f}-{max(ratios):.3f})" if len(ratios) > 1 else ""
        print(f"{name:40s}{ratio:8.3f}{goal:>10s}  {result:6s}{span}".rstrip())


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/ddp-train-bench",
                        help="cache folder for the generated images and shards")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="loader workers for (b) and (c)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5,
                        help="a-b-c / a-c-b repeats (medians over them)")
    parser.add_argument("--resume-reps", type=int, default=7, help="0%%/90%% resume pairs")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1,000 images, 1 round, 2 resume pairs")
    args = parser.parse_args()
    if args.quick:
        args.images, args.rounds, args.resume_reps = 1000, 1, 2
    if args.workers < 1:
        parser.error("--workers must be >= 1 (per-worker throughput is the point)")
    # One intra-op thread everywhere: DataLoader workers run with one, and "per worker" means one
    # core; the bare loop must not get a second core from torch's thread pool.
    torch.set_num_threads(1)

    t_start = time.perf_counter()
    os.makedirs(args.workdir, exist_ok=True)
    images, shards = prepare_data(args.workdir, args.images)
    files = list_files(images)
    transform = build_transform(DataConfig(image_size=IMAGE_SIZE), train=True)
    batches = len(shard_loader(shards, args.workers, args.batch))  # one epoch per measurement
    print(f"torch {torch.__version__} | {os.cpu_count()} CPUs | load avg "
          f"{os.getloadavg()[0]:.2f} | {len(files)} images, {batches} batches of {args.batch} "
          f"| {args.workers} workers | {args.rounds} rounds", flush=True)

    res: dict[str, list[float]] = {k: [] for k in ("a", "b", "c", "cpu_a", "cpu_b", "cpu_c",
                                                   "ttfb_b", "ttfb_c", "resume0", "resume90")}
    for r in range(args.rounds):
        rate, cpu = bare_loop(files, transform)
        res["a"].append(rate)
        res["cpu_a"].append(cpu)
        variants = ["b", "c"] if r % 2 == 0 else ["c", "b"]  # neither always runs first
        for key in variants:
            loader = (torchvision_loader(images, transform, args.workers, args.batch)
                      if key == "b" else shard_loader(shards, args.workers, args.batch, epoch=r))
            ttfb, rate, cpu = time_batches(loader, batches)
            res[key].append(rate)
            res["cpu_" + key].append(cpu)
            res["ttfb_" + key].append(ttfb)
        print(f"round {r + 1}: images/s a {res['a'][-1]:.0f}  b {res['b'][-1]:.0f}  "
              f"c {res['c'][-1]:.0f} | per CPU-s a {res['cpu_a'][-1]:.0f}  "
              f"b {res['cpu_b'][-1]:.0f}  c {res['cpu_c'][-1]:.0f}", flush=True)
    for _ in range(args.resume_reps):
        for fraction, key in ((0.0, "resume0"), (0.9, "resume90")):
            res[key].append(resumed_first_batch(shards, args.workers, args.batch, fraction))
    report(res, args.workers)
    print(f"\nload avg at the end {os.getloadavg()[0]:.2f} | total "
          f"{time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
