"""Checkpoints: atomic writes, sidecars, weights_only state, RNG, resume, pruning, timm loading."""
import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import timm
import timm.scheduler
import torch

from ddp_train import checkpoint as ckpt
from ddp_train.checkpoint import CheckpointError, CheckpointManager, config_hash
from ddp_train.config import CheckpointConfig, Config
from ddp_train.dist import DistInfo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = DistInfo()


def tiny_state(step: int) -> dict:
    return {"model": {"w": torch.full((4,), float(step))}, "step": step, "epoch": 0}


def manager(tmp_path, keep_last: int = 0, dist: DistInfo = MAIN) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(keep_last=keep_last), str(tmp_path / "ck"), dist)


def truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    m = manager(tmp_path)
    m.save(tiny_state(1), {}, step=1, epoch=0, periodic=False)

    def crash_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(OSError, match="disk full"):
        m.save(tiny_state(2), {}, step=2, epoch=0, periodic=False)
    assert ckpt.load(m.path("last.pt"))["step"] == 1
    assert ckpt.read_meta(m.path("last.pt"))["step"] == 1
    assert sorted(os.listdir(m.directory)) == ["last.pt", "last.pt.json"]  # temp file removed


def test_killed_save_keeps_old_file_and_temp_is_cleaned(tmp_path):
    m = manager(tmp_path)
    m.save(tiny_state(1), {}, step=1, epoch=0, periodic=False)
    # A real kill: the child dies inside torch.save with no chance to clean up.
    child = textwrap.dedent(f"""
        import os, torch
        from ddp_train.checkpoint import save_atomic
        def die(obj, f, *a, **k):
            f.write(b"PK\\x03\\x04 torn"); f.flush(); os._exit(9)
        torch.save = die
        save_atomic({m.path("last.pt")!r}, {{"step": 2}}, {{"step": 2}})
    """)
    proc = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == 9
    leftovers = [n for n in os.listdir(m.directory) if n.endswith(".tmp")]
    assert len(leftovers) == 1
    assert ckpt.load(m.path("last.pt"))["step"] == 1
    manager(tmp_path)  # the next run's manager drops the torn temp file
    assert sorted(os.listdir(m.directory)) == ["last.pt", "last.pt.json"]


def _folder_ckpt(path: str, step: int) -> None:
    os.makedirs(path)
    for part in ("rank0.pt", "rank1.pt"):  # same sizes every step, like real partitions
        with open(os.path.join(path, part), "w") as f:
            f.write(f"weights of step {step:04d}")


@pytest.mark.parametrize("kill_at", range(5))
def test_folder_swap_killed_at_any_point_leaves_a_described_checkpoint(tmp_path, kill_at):
    """A DeepSpeed-style folder checkpoint: kill the swap at each rename; recovery keeps one."""
    ck = tmp_path / "ck"
    last = str(ck / "last")
    _folder_ckpt(last, 1)
    ckpt.write_sidecar(last, {"step": 1}, keys=[])
    _folder_ckpt(str(ck / ".last.tmp"), 2)
    child = textwrap.dedent(f"""
        import os
        from ddp_train import checkpoint as ckpt
        real, calls = os.replace, [0]
        def replace(a, b):
            if calls[0] == {kill_at}:
                os._exit(9)  # a real kill: nothing after this rename runs
            calls[0] += 1
            real(a, b)
        os.replace = replace
        ckpt.replace_folder({str(ck / ".last.tmp")!r}, {last!r}, {{"step": 2}}, keys=[])
    """)
    proc = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": REPO})
    assert proc.returncode == (9 if kill_at < 4 else 0)  # 4 renames: (1)-(3) + the sidecar's
    m = CheckpointManager(CheckpointConfig(), str(ck), MAIN, suffix="")  # recovers, cleans
    step = ckpt.read_meta(last)["step"]
    assert step == (1 if kill_at < 4 else 2)
    assert open(os.path.join(last, "rank0.pt")).read() == f"weights of step {step:04d}"
    assert ckpt.loadable(last) and m.resume_path("auto") == last
    assert sorted(os.listdir(ck)) == ["last", "last.json"]


def test_sidecar_describes_checkpoint(tmp_path):
    m = manager(tmp_path, dist=DistInfo(world_size=1))
    state = {**tiny_state(7), "config_hash": "abc123def456"}
    meta = {"config_hash": "abc123def456", "model_name": "test_resnet", "num_classes": 3}
    path = m.save(state, meta, step=7, epoch=2, periodic=False)
    side = json.loads(open(path + ".json").read())
    assert side["format"] == ckpt.FORMAT
    assert (side["step"], side["epoch"], side["world_size"]) == (7, 2, 1)
    assert side["model_name"] == "test_resnet" and side["num_classes"] == 3
    assert side["config_hash"] == "abc123def456"
    assert side["size"] == os.path.getsize(path)
    assert side["keys"] == sorted(state)
    assert isinstance(side["time"], float)


def test_full_state_loads_weights_only(tmp_path):
    model = timm.create_model("test_resnet", num_classes=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = timm.scheduler.CosineLRScheduler(opt, t_initial=10, warmup_t=2, warmup_lr_init=1e-5)
    sched.step_update(3)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scaler": torch.amp.GradScaler("cpu").state_dict(), "scheduler": sched.state_dict(),
             "ema": model.state_dict(), "loader": {"epoch": 1, "batches": 17},
             "rng": ckpt.rng_state(), "step": 3, "epoch": 1, "config_hash": "0" * 12}
    path = str(tmp_path / "full.pt")
    ckpt.save_atomic(path, state, {"step": 3})
    loaded = ckpt.load(path)  # weights_only=True inside
    assert loaded["scheduler"] == sched.state_dict()
    assert loaded["loader"] == state["loader"] and loaded["step"] == 3
    exp_avg = opt.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], exp_avg)
    ckpt.set_rng_state(loaded["rng"])


def test_load_rejects_corrupt_and_missing_files(tmp_path):
    path = str(tmp_path / "x.pt")
    ckpt.save_atomic(path, tiny_state(1), {})
    truncate(path)
    with pytest.raises(CheckpointError, match="x.pt"):
        ckpt.load(path)
    with pytest.raises(FileNotFoundError):
        ckpt.load(str(tmp_path / "missing.pt"))


def test_rng_round_trip_reproduces_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    path = str(tmp_path / "rng.pt")
    ckpt.save_atomic(path, {"rng": ckpt.rng_state()}, {})
    draws = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load(path)["rng"])
    again = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_keep_last_prunes_step_files(tmp_path):
    m = manager(tmp_path, keep_last=2)
    for step in range(1, 5):
        m.save(tiny_state(step), {}, step=step, epoch=0, periodic=True)
    m.save(tiny_state(5), {}, step=5, epoch=0, periodic=False)  # not periodic: last.pt only
    assert sorted(os.listdir(m.directory)) == [
        "last.pt", "last.pt.json", "step_00000003.pt", "step_00000003.pt.json",
        "step_00000004.pt", "step_00000004.pt.json"]
    assert ckpt.load(m.path("last.pt"))["step"] == 5


def test_no_step_files_when_keep_last_is_zero(tmp_path):
    m = manager(tmp_path, keep_last=0)
    m.save(tiny_state(1), {}, step=1, epoch=0, periodic=True)
    assert sorted(os.listdir(m.directory)) == ["last.pt", "last.pt.json"]


def test_only_rank_zero_writes(tmp_path):
    m = manager(tmp_path, keep_last=2, dist=DistInfo(rank=1, world_size=2))
    assert m.save(tiny_state(1), {}, step=1, epoch=0, periodic=True) is None
    assert m.save_best(tiny_state(1), {}, step=1, epoch=0) is None
    assert not os.path.exists(m.directory)


def test_resume_auto_picks_newest_loadable(tmp_path):
    m = manager(tmp_path, keep_last=3)
    assert m.resume_path("auto") is None  # nothing saved yet
    for step in (1, 2, 3):
        m.save(tiny_state(step), {}, step=step, epoch=0, periodic=True)
    m.save_best(tiny_state(3), {}, step=3, epoch=0)  # best.pt is never a resume candidate
    assert m.resume_path("auto") == m.path("last.pt")  # ties with step 3: last.pt wins

    truncate(m.path("last.pt"))
    with pytest.warns(UserWarning, match="last.pt"):
        assert m.resume_path("auto") == m.path("step_00000003.pt")

    truncate(m.path("step_00000003.pt"))
    with pytest.warns(UserWarning) as caught:
        assert m.resume_path("auto") == m.path("step_00000002.pt")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "last.pt" in messages[0] and "step_00000003.pt" in messages[1]


def test_resume_empty_and_explicit_paths(tmp_path):
    m = manager(tmp_path)
    assert m.resume_path("") is None
    path = m.save(tiny_state(1), {}, step=1, epoch=0, periodic=False)
    assert m.resume_path(path) == path
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        m.resume_path(str(tmp_path / "nope.pt"))


def test_best_loads_into_timm_create_model(tmp_path):
    assert "test_resnet" in timm.list_models("test_*")
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    m = manager(tmp_path)
    state = {"model": model.state_dict(), "ema": None, "step": 10, "epoch": 1}
    path = m.save_best(state, {"model_name": "test_resnet", "num_classes": 3}, step=10, epoch=1)
    assert ckpt.read_meta(path)["step"] == 10
    torch.manual_seed(1)  # different init, so equality below proves the load
    loaded = timm.create_model("test_resnet", num_classes=3, checkpoint_path=path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_config_hash_is_canonical():
    h = config_hash({"a": 1, "b": [1, 2]})
    assert len(h) == 12 and int(h, 16) >= 0
    assert h == config_hash({"b": [1, 2], "a": 1})
    assert h != config_hash({"a": 2, "b": [1, 2]})
    cfg = Config()
    assert config_hash(cfg) == config_hash(Config())
    cfg.train.batch_size = 64
    assert config_hash(cfg) != config_hash(Config())


class Counter:
    """A stateful part: ``state_dict`` / ``load_state_dict`` of one number."""

    def __init__(self, n: int = 0) -> None:
        self.n = n

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.n = state["n"]


def test_parts_round_trip_through_a_file(tmp_path):
    parts = {"a": Counter(3), "b": Counter(5), "rng": ckpt.RngStates(MAIN)}
    path = str(tmp_path / "x.pt")
    ckpt.save_atomic(path, ckpt.capture(parts), {})
    draw = torch.rand(2)
    back = {"a": Counter(), "b": Counter(), "rng": ckpt.RngStates(MAIN)}
    ckpt.restore(back, ckpt.load(path), source=path)
    assert (back["a"].n, back["b"].n) == (3, 5)
    assert torch.equal(torch.rand(2), draw)  # the RNG state came back too


def test_restore_refuses_entries_nobody_reads_or_misses(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing \['b'\], unexpected \['c'\]"):
        ckpt.restore({"a": Counter(), "b": Counter()}, {"a": {"n": 1}, "c": {"n": 2}}, "x.pt")


def test_format_1_state_is_upgraded_on_restore():
    guard = Counter(7)  # a part added after format 1: keeps its fresh state
    parts = {"step": Counter(), "loader": Counter(), "nonfinite": guard}
    ckpt.restore(parts, {"step": {"n": 12}, "epoch": 1, "config_hash": "0" * 12,
                         "loader": {"n": 4}})
    assert (parts["step"].n, parts["loader"].n, guard.n) == (12, 4, 7)
    with pytest.raises(CheckpointError, match=r"unexpected \['epoch'\]"):  # not format 1
        ckpt.restore({"step": Counter()}, {"step": {"n": 1}, "epoch": 1})


def test_config_diff_names_changed_keys():
    old, new = Config(), Config()
    new.optim.lr, new.train.epochs, new.run.resume = 1e-4, 20, "auto"
    new.engine.deepspeed = {"zero_optimization": {"stage": 2}}
    diff = ckpt.config_diff(dataclasses.asdict(old), dataclasses.asdict(new))
    assert diff == {"engine.deepspeed": [{}, {"zero_optimization": {"stage": 2}}],
                    "optim.lr": [old.optim.lr, 1e-4], "train.epochs": [8, 20]}  # not run.resume
    assert ckpt.describe_diff({"train.epochs": [8, 20]}) == "train.epochs 8 -> 20"
    assert ckpt.config_diff({"a": {"x": 1}}, {"a": {"y": 1}}) == {"a.x": [1, None],
                                                                  "a.y": [None, 1]}


def test_weights_from_run_folder_file_and_export(tmp_path):
    m = manager(tmp_path)
    m.save(tiny_state(4), {}, step=4, epoch=0, periodic=False)
    run = str(tmp_path)
    os.rename(m.directory, os.path.join(run, "checkpoints"))
    last = os.path.join(run, "checkpoints", "last.pt")
    assert ckpt.find_checkpoint(run) == last and ckpt.find_checkpoint(last) == last
    assert torch.equal(ckpt.read_weights(last)["w"], torch.full((4,), 4.0))
    with pytest.raises(FileNotFoundError, match="no such run folder"):
        ckpt.find_checkpoint(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty" / "checkpoints")
    with pytest.raises(FileNotFoundError, match="holds no last checkpoint"):
        ckpt.find_checkpoint(str(tmp_path / "empty"))
