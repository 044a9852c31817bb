"""Multi-day-run failures on real processes: stop signals, killed ranks, hangs, NaNs, bad disks.

Every interrupted run is compared with the same run left alone: resuming must give the same
final weights bit for bit (CPU, one thread per rank, fixed seeds).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, torchrun_env
from ddp_train import checkpoint as ckpt
from ddp_train.config import load_config
from ddp_train.demo import ensure_digits
from ddp_train.dist import DistInfo
from ddp_train.guard import WATCHDOG_EXIT_CODE
from ddp_train.trainer import train

STEPS = 24


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "digits")
    ensure_digits(root, DistInfo())
    return root


def _args(digits: str, run_dir: str, *more: str) -> list[str]:
    return [f"data.shards={digits}", f"run.path={run_dir}", f"train.max_steps={STEPS}",
            "data.num_workers=2", "eval.every_epoch=false", "eval.test_at_end=false",
            "log.progress=plain", "seed=7", *more]


def _start(args: list[str], nproc: int = 0, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    """``python -m ddp_train ARGS`` (nproc 0) or ``torchrun --nproc_per_node=nproc ...``."""
    launcher = ([sys.executable] if not nproc else
                [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                 "--standalone", *extra])
    return subprocess.Popen([*launcher, "-m", "ddp_train", *args], env=torchrun_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"run did not end within {timeout}s (hang?)\n{out[-4000:]}")
    return proc.returncode, out


def _run(args: list[str], nproc: int = 0, expect: int = 0) -> str:
    code, out = _finish(_start(args, nproc))
    assert code == expect, f"exit {code}, expected {expect}\n{out[-5000:]}"
    return out


def _records(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.get("step", 0) >= step and "loss" in r for r in _records(run_dir)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"step {step} not reached within {timeout}s")


def _weights(run_dir: str) -> dict[str, torch.Tensor]:
    return ckpt.load(os.path.join(run_dir, "checkpoints", "last.pt"))["model"]


def _assert_same_weights(a: str, b: str) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def _steps_logged(run_dir: str) -> set[int]:
    return {r["step"] for r in _records(run_dir) if "loss" in r}


@pytest.fixture(scope="module")
def reference_1(digits, tmp_path_factory) -> str:
    """The uninterrupted single-process run (2 loader workers) that interrupted ones must match."""
    run_dir = str(tmp_path_factory.mktemp("ref1") / "run")
    _run(_args(digits, run_dir))
    return run_dir


@pytest.fixture(scope="module")
def reference_2(digits, tmp_path_factory) -> str:
    """The uninterrupted 2-rank x 2-worker run."""
    run_dir = str(tmp_path_factory.mktemp("ref2") / "run")
    _run(_args(digits, run_dir), nproc=2)
    return run_dir


def _interrupt_and_resume(digits, run_dir, nproc, sig, at_step) -> list[dict]:
    """Start a run, send ``sig`` to the launcher once ``at_step`` is logged, then resume it."""
    proc = _start(_args(digits, run_dir), nproc)
    _wait_for_step(run_dir, at_step, proc)
    proc.send_signal(sig)
    code, out = _finish(proc)
    records = _records(run_dir)
    stopped = [r for r in records if r.get("event") == "preempted"]
    assert len(stopped) == 1, f"no preempted event (exit {code}, signal at step {at_step})\n" \
                              f"{out[-4000:]}"
    if not nproc:  # torchrun exits with its own code; a plain process exits 128+signal
        assert code == 128 + sig, out[-3000:]
    assert stopped[0]["signal"] == signal.Signals(sig).name
    step = stopped[0]["step"]
    assert step >= at_step and ckpt.read_meta(
        os.path.join(run_dir, "checkpoints", "last.pt"))["step"] == step
    _run([*_args(digits, run_dir), "--resume", "auto"], nproc)
    records = _records(run_dir)
    after = records.index(stopped[0]) + 1  # the resumed launch's first record
    assert {"event": "resume", "step": step}.items() <= records[after].items()
    return records


def test_sigterm_checkpoints_and_resume_is_bit_exact(digits, reference_1, tmp_path):
    at_step = random.Random().randint(2, STEPS - 6)  # a different step every run
    run_dir = str(tmp_path / "run")
    _interrupt_and_resume(digits, run_dir, 0, signal.SIGTERM, at_step)
    assert _steps_logged(run_dir) == set(range(1, STEPS + 1)), f"signal at step {at_step}"
    _assert_same_weights(reference_1, run_dir)


def test_two_ranks_two_workers_sigterm_to_torchrun_resume_is_bit_exact(digits, reference_2,
                                                                       tmp_path):
    at_step = random.Random().randint(2, STEPS - 6)
    run_dir = str(tmp_path / "run")
    records = _interrupt_and_resume(digits, run_dir, 2, signal.SIGTERM, at_step)
    assert _steps_logged(run_dir) == set(range(1, STEPS + 1)), f"signal at step {at_step}"
    ref_loss = {r["step"]: r["loss"] for r in _records(reference_2) if "loss" in r}
    assert all(r["loss"] == ref_loss[r["step"]] for r in records if "loss" in r)
    _assert_same_weights(reference_2, run_dir)


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _rank_pid(torchrun_pid: int, rank: int) -> int:
    for pid in _children(torchrun_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except OSError:
            continue
        if env.get(b"RANK") == str(rank).encode():
            return pid
    raise AssertionError(f"no rank {rank} among torchrun's children")


def test_sigkilled_rank_restarts_group_and_auto_resumes(digits, reference_2, tmp_path):
    """torchrun --max-restarts=1 restarts both ranks; they continue from the newest checkpoint."""
    run_dir = str(tmp_path / "run")
    proc = _start(_args(digits, run_dir, "checkpoint.every_steps=4"), nproc=2,
                  extra=("--max-restarts=1",))
    _wait_for_step(run_dir, 10, proc)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
    code, out = _finish(proc)
    assert code == 0, out[-5000:]
    records = _records(run_dir)
    resumes = [r for r in records if r.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] % 4 == 0 and resumes[0]["step"] >= 8
    assert max(_steps_logged(run_dir)) == STEPS
    _assert_same_weights(reference_2, run_dir)


def test_hung_rank_dumps_stacks_and_exits(digits, tmp_path):
    """Rank 1 sleeps inside a step; both ranks' watchdogs fire (rank 0 waits in the all-reduce)."""
    run_dir = str(tmp_path / "run")
    script = os.path.join(ROOT, "tests", "dist_scripts", "hang_check.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           script, *_args(digits, run_dir, "watchdog.timeout=10", "data.num_workers=0")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=torchrun_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    dumps = sorted(f for f in os.listdir(run_dir) if f.startswith("hang-rank"))
    assert [d.split("-")[1] for d in dumps] == ["rank0", "rank1"], proc.stderr[-3000:]
    rank1 = open(os.path.join(run_dir, dumps[1])).read()
    assert "hang_forever" in rank1 and "no step completed" in rank1
    assert f"exitcode  : {WATCHDOG_EXIT_CODE}" in proc.stderr or "124" in proc.stderr
    assert time.monotonic() - t0 < 200  # the process group timeout did not have to fire


def _quick(digits: str, run_dir: str, *more: str):
    torch.set_num_threads(1)
    return load_config(None, [*_args(digits, run_dir, "data.num_workers=0"), *more])


def test_nonfinite_steps_are_skipped_then_the_run_stops(digits, tmp_path, capsys):
    from ddp_train.__main__ import main

    run_dir = str(tmp_path / "run")
    # An absurd learning rate: the first update sends the weights to inf, every later loss is NaN.
    code = main(_args(digits, run_dir, "data.num_workers=0", "optim.lr=1e30",
                      "train.max_nonfinite_steps=3", "schedule.warmup_steps=1"))
    assert code == 3
    err = capsys.readouterr().err
    assert "diverged: 3 consecutive non-finite steps" in err and err.count("\n") == 1
    records = _records(run_dir)
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 3 and all(r["grad_norm"] is None for r in skipped)
    assert len([r for r in records if r.get("event") == "nonfinite"]) == 3
    weights = _weights(run_dir)  # saved at the stop: the last weights an update produced
    assert ckpt.read_meta(os.path.join(run_dir, "checkpoints", "last.pt"))["step"] == \
        skipped[-1]["step"]
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point()) or \
        skipped[0]["step"] == 1


def test_wall_clock_checkpoints_failed_saves_and_corrupt_fallback(digits, tmp_path):
    run_dir = str(tmp_path / "run")
    result = train(_quick(digits, run_dir, "train.max_steps=6", "checkpoint.every_minutes=0.0001",
                          "checkpoint.keep_last=10"), DistInfo())
    assert result["step"] == 6
    snapshots = sorted(f for f in os.listdir(os.path.join(run_dir, "checkpoints"))
                       if f.startswith("step_") and f.endswith(".pt"))
    assert len(snapshots) >= 4  # a few ms per step exceed 6 ms: nearly every step saves

    # Resume past a torn last.pt: the newest intact snapshot is used and the log says so.
    last = os.path.join(run_dir, "checkpoints", "last.pt")
    with open(last, "r+b") as f:
        f.truncate(os.path.getsize(last) // 2)
    ckpt.write_sidecar(last, {**ckpt.read_meta(last), "step": 6}, keys=[])
    result = train(_quick(digits, run_dir, "train.max_steps=8", "run.resume=auto"), DistInfo())
    log = open(os.path.join(run_dir, "train.log")).read()
    assert "WARNING: resume=auto: skipping" in log and snapshots[-1] in log
    assert result["step"] == 8

    # A save that fails (here: last.pt is a folder, so the rename cannot land) is reported and
    # the run goes on to its end.
    other = str(tmp_path / "other")
    os.makedirs(os.path.join(other, "checkpoints", "last.pt"))
    result = train(_quick(digits, other, "train.max_steps=3", "checkpoint.every_steps=1",
                          "run.resume=auto"),
                   DistInfo())
    assert result["step"] == 3
    failed = [r for r in _records(other) if r.get("event") == "checkpoint_failed"]
    assert [r["step"] for r in failed] == [1, 2, 3]
    assert "not saved, training continues" in open(os.path.join(other, "train.log")).read()


def test_low_disk_space_refuses_to_start_a_checkpoint(tmp_path, monkeypatch):
    from ddp_train.config import CheckpointConfig

    manager = ckpt.CheckpointManager(CheckpointConfig(), str(tmp_path), DistInfo())
    manager.save({"x": torch.ones(4)}, {}, step=1, epoch=0, periodic=False)
    monkeypatch.setattr(ckpt.manager, "MIN_FREE_BYTES", 2**62)  # more than any disk has free
    with pytest.raises(OSError, match="not enough free disk"):
        manager.save({"x": torch.zeros(4)}, {}, step=2, epoch=0, periodic=False)
    assert torch.equal(ckpt.load(manager.path("last.pt"))["x"], torch.ones(4))  # untouched
