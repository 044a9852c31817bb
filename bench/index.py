"""Index benchmark: ``ddp-shards index`` throughput against ``tar -tf`` on the same shards.

Full run (about 1 minute on the 2-core shared VM)::

    .venv/bin/python bench/index.py

Smoke run::

    .venv/bin/python bench/index.py --quick

It writes ``--shards`` WebDataset shards of ``--samples`` JPEGs each (``webdataset.TarWriter``,
``jpg`` + ``cls`` members, like most shards in the wild) into a temporary folder, reads them
all once so every variant reads from the page cache, then times, interleaved over
``--repeats`` rounds:

* ``tar -tf``: GNU tar listing each shard, one process per shard, one at a time and
  ``--workers`` at a time (``xargs -P``) -- the baseline the issue names;
* ``sha256sum``: every byte read and hashed, the floor for any index that hashes its shards;
* ``ddp-shards index`` with 1 and ``--workers`` processes, into a fresh ``--out`` each time
  (nothing is skipped as already indexed);
* the re-run of an index that finished: it reads no shard.

Prints MB/s and shards/s per variant and the ratio of each to ``tar -tf`` with the same
parallelism, medians over the rounds.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=48)
    p.add_argument("--samples", type=int, default=250, help="samples per shard")
    p.add_argument("--size", type=int, default=96, help="image side in pixels")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="8 shards, 1 round")
    return p.parse_args()


def write_shards(root: str, shards: int, samples: int, size: int) -> None:
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(shards):
        with wds.TarWriter(os.path.join(root, f"train-{k:06d}.tar")) as w:
            for i in range(samples):
                # smooth noise: JPEG sizes like photos (~3-5 KB at 96 px), not incompressible
                small = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                w.write({"__key__": f"{k:06d}_{i:05d}", "jpg": buf.getvalue(), "cls": i % 7})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.quick:
        args.shards, args.repeats = 8, 1
    from ddp_train.shards.index import IndexSettings, index

    work = tempfile.mkdtemp(prefix="bench_index_")
    try:
        root = os.path.join(work, "shards")
        os.makedirs(root)
        write_shards(root, args.shards, args.samples, args.size)
        names = sorted(os.listdir(root))
        paths = [os.path.join(root, n) for n in names]
        total_mb = sum(os.path.getsize(p) for p in paths) / 2**20
        for p in paths:  # warm the page cache: every variant reads from memory
            with open(p, "rb") as f:
                while f.read(1 << 20):
                    pass
        w = args.workers
        xargs = ["xargs", "-0", "-n", "1", "-P", str(w)]
        listing = "\0".join(paths).encode()
        runs = {}

        def fresh_index(workers: int) -> None:
            out = tempfile.mkdtemp(dir=work)
            index(root, out=out, settings=IndexSettings(workers=workers, progress="none"))

        done = os.path.join(work, "done")
        os.makedirs(done)
        index(root, out=done, settings=IndexSettings(workers=w, progress="none"))
        variants = {
            "tar -tf, 1 at a time": lambda: [subprocess.run(["tar", "-tf", p], check=True,
                                                            stdout=subprocess.DEVNULL)
                                             for p in paths],
            f"tar -tf, {w} at a time": lambda: subprocess.run(
                xargs + ["tar", "-tf"], input=listing, check=True, stdout=subprocess.DEVNULL),
            "sha256sum, 1 process": lambda: subprocess.run(["sha256sum", *paths], check=True,
                                                           stdout=subprocess.DEVNULL),
            "ddp-shards index, 1 worker": lambda: fresh_index(1),
            f"ddp-shards index, {w} workers": lambda: fresh_index(w),
            "re-run of a finished index": lambda: index(
                root, out=done, settings=IndexSettings(workers=w, progress="none")),
        }
        devnull = open(os.devnull, "w")
        for _ in range(args.repeats):
            for name, fn in variants.items():
                stdout, sys.stdout = sys.stdout, devnull  # index prints its skip line
                try:
                    runs.setdefault(name, []).append(timed(fn))
                finally:
                    sys.stdout = stdout
        print(f"{args.shards} shards x {args.samples} JPEGs ({args.size} px), {total_mb:.1f} MB, "
              f"page cache warm, medians of {args.repeats} rounds, {os.cpu_count()} CPUs")
        base = {1: statistics.median(runs["tar -tf, 1 at a time"]),
                w: statistics.median(runs[f"tar -tf, {w} at a time"])}
        print(f"{'variant':34s} {'seconds':>8s} {'MB/s':>8s} {'shards/s':>9s} {'vs tar -tf':>10s}")
        for name, times in runs.items():
            t = statistics.median(times)
            par = w if f"{w} " in name and "at a time" in name or f"{w} workers" in name else 1
            ratio = f"{t / base[par]:.2f}x" if "re-run" not in name else "-"
            print(f"{name:34s} {t:8.3f} {total_mb / t:8.1f} {args.shards / t:9.1f} {ratio:>10s}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
