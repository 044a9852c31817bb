"""Plotting benchmark: ``plot_training_curve.py`` vs pandas.read_json + plain matplotlib.

Full run (a few minutes on the 2-core shared VM; the first run also writes the log)::

    .venv/bin/python bench/plot.py

Smoke run (100,000 steps, one round, < 1 minute once the log exists)::

    .venv/bin/python bench/plot.py --quick

The log is a generated metrics.jsonl of ``--steps`` (default 1,000,000) optimizer steps in 4
launches: 3 restarts, each resuming from a checkpoint 2,000-5,000 steps before the kill, so those
steps repeat and the later values must win. 100 epochs, cosine LR with warmup, a noisy decaying
loss with rare spikes and a few nulls (non-finite losses). It is written once to
``<workdir>/plot-<steps>.jsonl`` and reused.

Two variants, each a fresh Python process (imports included), run alternately for ``--rounds``:

  ddp-plot   ``python plot_training_curve.py --log <log> --output <dir>``: all its figures
             (the six below, throughput, step time, overview sheet),
  baseline   ``pandas.read_json(lines=True)``, keep the last record per step, then the same six
             figures with plain pyplot: raw loss, EMA + rolling median, epoch mean with min/max
             band, LR, % reduction per epoch, box plot per epoch; every point drawn.

Reported: wall seconds per variant (median, min-max over rounds), the ratio of medians, and the
CPU seconds of each child process (``getrusage``), which moves less with other people's load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pandas as pd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 100
RESTARTS = 3

# The six figures with nothing but pandas and pyplot, as someone would write them by hand.
BASELINE = r'''
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

log, out = sys.argv[1], sys.argv[2]
df = pd.read_json(log, lines=True)
resumes = df.loc[df["event"] == "resume", "step"]
steps = df[df["event"].isna()].drop_duplicates("step", keep="last").sort_values("step")
window = max(5, len(steps) // 100 // 2 * 2 + 1)

def save(fig, name):
    fig.savefig(f"{out}/{name}.png", dpi=120)
    plt.close(fig)

fig, ax = plt.subplots(figsize=(9, 5))
ax.plot(steps["step"], steps["loss"], linewidth=0.6)
for s in resumes:
    ax.axvline(s, linestyle=":")
ax.set(title="loss per step", xlabel="step", ylabel="loss")
save(fig, "loss_raw")

fig, ax = plt.subplots(figsize=(9, 5))
ax.plot(steps["step"], steps["loss"], linewidth=0.5, alpha=0.25)
ax.plot(steps["step"], steps["loss"].ewm(span=window).mean(), label="EMA")
ax.plot(steps["step"], steps["loss"].rolling(window, center=True, min_periods=1).median(),
        "--", label="median")
ax.legend()
save(fig, "loss_smoothed")

epochs = steps.groupby("epoch")["loss"].agg(["mean", "min", "max"])
fig, ax = plt.subplots(figsize=(9, 5))
ax.plot(epochs.index, epochs["mean"], "-o")
ax.fill_between(epochs.index, epochs["min"], epochs["max"], alpha=0.2)
save(fig, "loss_per_epoch")

fig, ax = plt.subplots(figsize=(9, 5))
ax.plot(steps["step"], steps["lr"])
save(fig, "lr")

initial = steps["loss"].dropna().iloc[:10].mean()
fig, ax = plt.subplots(figsize=(9, 5))
ax.plot(epochs.index, 100 * (1 - epochs["mean"] / initial), "-o")
save(fig, "loss_reduction")

fig, ax = plt.subplots(figsize=(9, 5))
groups = [g.dropna().to_numpy() for _, g in steps.groupby("epoch")["loss"]]
ax.boxplot(groups, positions=list(epochs.index))
save(fig, "loss_boxplot")
'''


# ----------------------------------------------------------------------------- the log

def launch_steps(first: int, last: int, total: int, rng: np.random.Generator) -> pd.DataFrame:
    """Step records ``first..last`` of a ``total``-step run, as the trainer would log them."""
    step = np.arange(first, last + 1)
    per_epoch = total // EPOCHS
    warmup = total // 50
    lr = np.where(step < warmup, 1e-3 * step / warmup,
                  5e-4 * (1 + np.cos(np.pi * (step - warmup) / (total - warmup))))
    loss = 2.3 * np.exp(-4 * step / total) + 0.15 + rng.gamma(2.0, 0.06, len(step))
    spikes = rng.random(len(step)) < 1e-4
    loss[spikes] *= rng.uniform(3, 10, spikes.sum())  # rare spikes the plot must keep
    loss[rng.random(len(step)) < 2e-6] = np.nan  # a diverged step is logged as null
    step_s = rng.gamma(20.0, 0.05, len(step))
    return pd.DataFrame({
        "step": step, "epoch": np.minimum((step - 1) // per_epoch, EPOCHS - 1), "loss": loss,
        "lr": lr, "grad_norm": loss * rng.uniform(1, 3, len(step)),
        "samples_per_s": 256 / step_s, "data_s": step_s * rng.uniform(0, 0.2, len(step)),
        "step_s": step_s, "elapsed_s": np.cumsum(step_s), "gpu_mem_gb": 11.2,
        "time": 1.79e9 + step * 1.08})


def write_log(path: str, total: int) -> None:
    """A metrics.jsonl of ``total`` steps in 1 + RESTARTS launches (steps repeat after each)."""
    rng = np.random.default_rng(0)
    kills = np.linspace(0, total, RESTARTS + 2).astype(int)[1:-1]
    resumes = kills - rng.integers(2000, 5000, RESTARTS)
    starts, ends = [0, *resumes], [*kills, total]
    with open(path, "w", encoding="utf-8") as f:
        for i, (start, end) in enumerate(zip(starts, ends)):
            now = 1.79e9 + int(start) * 1.08
            if i:
                f.write(json.dumps({"event": "resume", "step": int(start), "time": now}) + "\n")
            f.write(json.dumps({"event": "start", "step": int(start), "world_size": 8,
                                "model": "resnet50", "batch_size": 32, "grad_accum": 1,
                                "updates_per_epoch": total // EPOCHS, "total_steps": total,
                                "time": now}) + "\n")
            frame = launch_steps(int(start) + 1, int(end), total, rng)
            f.write(frame.to_json(orient="records", lines=True, double_precision=15))
            f.write("\n")
        f.write(json.dumps({"event": "end", "step": total, "reason": "done",
                            "time": 1.79e9 + total * 1.08}) + "\n")


# ----------------------------------------------------------------------------- timing

def timed(cmd: list[str]) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, CPU seconds of the child). Fails loudly on error."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"{cmd[1]} failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100,000 steps, one round")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                          "ddp-train-bench"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds = 100_000, 1
    os.makedirs(args.workdir, exist_ok=True)
    log = os.path.join(args.workdir, f"plot-{args.steps}.jsonl")
    if not os.path.exists(log):
        t0 = time.perf_counter()
        write_log(log + ".tmp", args.steps)
        os.replace(log + ".tmp", log)
        print(f"wrote {log} in {time.perf_counter() - t0:.0f} s")
    print(f"log: {args.steps:,} steps, {RESTARTS} restarts, {os.path.getsize(log) / 1e6:.0f} MB; "
          f"load average {os.getloadavg()[0]:.1f}")
    out = {name: os.path.join(args.workdir, f"plot-out-{name}") for name in ("ours", "base")}
    for folder in out.values():
        os.makedirs(folder, exist_ok=True)
    commands = {
        "ddp-plot": [sys.executable, "plot_training_curve.py", "--log", log,
                     "--output", out["ours"]],
        "baseline": [sys.executable, "-c", BASELINE, log, out["base"]],
    }
    results: dict = {name: [] for name in commands}
    for round_ in range(args.rounds):
        order = list(commands) if round_ % 2 == 0 else list(reversed(commands))
        for name in order:
            wall, cpu = timed(commands[name])
            results[name].append((wall, cpu))
            print(f"round {round_ + 1} {name:9s} wall {wall:6.1f} s  cpu {cpu:6.1f} s")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}\n")
    print("| variant | wall s, median | (min-max) | CPU s, median |")
    print("|---|---|---|---|")
    medians = {}
    for name, runs in results.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        medians[name] = statistics.median(walls), statistics.median(cpus)
        print(f"| {name} | {medians[name][0]:.1f} | ({min(walls):.1f}-{max(walls):.1f}) | "
              f"{medians[name][1]:.1f} |")
    wall_ratio = medians["ddp-plot"][0] / medians["baseline"][0]
    cpu_ratio = medians["ddp-plot"][1] / medians["baseline"][1]
    print(f"\nddp-plot / baseline: wall {wall_ratio:.3f}, CPU {cpu_ratio:.3f} "
          f"(target <= 0.5: {'met' if wall_ratio <= 0.5 else 'NOT met'})")


if __name__ == "__main__":
    main()
