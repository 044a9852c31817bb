"""Shared test set-up: the repo on sys.path, small thread counts, a torchrun helper."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ helpers (shardgen)


def torchrun_env() -> dict:
    """Environment for child processes: repo importable, one thread per rank (2 CPU cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240,
                 extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``script`` under a real ``torchrun --nproc_per_node=nproc`` (gloo on CPU).

    A timeout fails the test instead of hanging CI: a DDP hang shows up as a failure here.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", *extra, script, *args]
    try:
        proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"torchrun {os.path.basename(script)} timed out after {timeout}s (hang?)\n"
                    f"{(e.stderr or b'')[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun {os.path.basename(script)} exited {proc.returncode}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


def read_json(path: str):
    """Load a JSON file written by a child process."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
