"""Streaming loader: exact equal train epochs, exact eval, resume, corrupt samples, pipe: URLs."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch

from conftest import ROOT, read_json, run_torchrun
from ddp_train.config import DataConfig
from ddp_train.data import build_loader, plan
from ddp_train.dist import DistInfo
from shardgen import random_layout, write_shards


# ----------------------------------------------------------------------------- plan (pure)

@pytest.mark.parametrize("trial", range(200))
def test_plan_partitions_positions_exactly(trial):
    rng = random.Random(trial)
    n, world, batch, roles = rng.randint(1, 500), rng.randint(1, 8), rng.randint(1, 9), rng.randint(1, 6)
    layout = lambda rank, train: plan.RankLayout(num_samples=n, world_size=world, rank=rank,
                                                 roles=roles, batch_size=batch, train=train)
    # eval: the union of every (rank, role) range is [0, n), no overlap
    seen = []
    for rank in range(world):
        for role in range(roles):
            r = layout(rank, False).role_range(role)
            seen += range(r.begin, r.end)
    assert sorted(seen) == list(range(n))
    # train: every rank gets steps * batch positions, disjoint, dropping < one global batch
    if n < world * batch:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            layout(0, True).train_steps()
        return
    steps = layout(0, True).train_steps()
    seen = []
    for rank in range(world):
        mine = []
        for role in range(roles):
            r = layout(rank, True).role_range(role, consumed_batches=0)
            assert (r.end - r.begin) % batch == 0
            mine += range(r.begin, r.end)
        assert len(mine) == steps * batch
        seen += mine
    assert len(set(seen)) == len(seen) and n - len(seen) < world * batch
    assert max(seen) < n


def test_pieces_cover_ranges_across_shard_boundaries():
    lengths = [3, 0, 5, 1, 4]
    order = [4, 0, 2, 1, 3]
    flat = [(s, i) for s in order for i in range(lengths[s])]
    for begin in range(len(flat)):
        for end in range(begin, len(flat) + 1):
            got = [(p.shard, p.start + k) for p in plan.pieces(lengths, order, begin, end)
                   for k in range(p.count)]
            assert got == flat[begin:end]


def test_shard_order_depends_on_seed_and_epoch_only():
    assert plan.shard_order(50, 1, 2, shuffle=True) == plan.shard_order(50, 1, 2, shuffle=True)
    assert plan.shard_order(50, 1, 2, shuffle=True) != plan.shard_order(50, 1, 3, shuffle=True)
    assert plan.shard_order(5, 1, 2, shuffle=False) == list(range(5))


# ------------------------------------------------------------------ single process, real I/O

def _ids(loader):
    return [i for _, labels in loader for i in labels.tolist()]


def test_single_process_epoch_and_eval(tmp_path):
    write_shards(str(tmp_path), {"train": [10, 1, 22, 4], "val": [3, 3, 1]})
    cfg = DataConfig(shards=str(tmp_path), image_size=8, num_workers=0, shuffle_buffer=6)
    train = build_loader(cfg, DistInfo(), split="train", train=True, batch_size=4, seed=0)
    assert len(train) == 37 // 4
    first = [labels.tolist() for _, labels in train]
    assert len(first) == 9 and all(len(b) == 4 for b in first)
    assert len({i for b in first for i in b}) == 36 and train.epoch == 1
    second = [labels.tolist() for _, labels in train]
    assert first != second  # reshuffled per epoch
    val = build_loader(cfg, DistInfo(), split="val", train=False, batch_size=4, seed=0)
    assert _ids(val) == list(range(37, 44)) and len(val) == 2


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 4 > 2 cores
def test_more_workers_than_shards(tmp_path):
    write_shards(str(tmp_path), {"train": [23], "val": [5]})
    cfg = DataConfig(shards=str(tmp_path), image_size=8, num_workers=4, shuffle_buffer=4)
    train = build_loader(cfg, DistInfo(rank=1, world_size=2), split="train", train=True,
                         batch_size=2, seed=0)
    batches = list(train)
    assert len(batches) == len(train) == 5
    # workers send labels as a list; the loader hands out the same int64 tensor as before
    assert all(y.dtype == torch.int64 and y.shape == (2,) and x.shape[0] == 2
               for x, y in batches)
    val = build_loader(cfg, DistInfo(rank=1, world_size=2), split="val", train=False,
                       batch_size=2, seed=0)
    assert sorted(_ids(val)) == [25, 26, 27]


def test_corrupt_samples_logged_and_train_count_kept(tmp_path):
    root = str(tmp_path / "ds")
    write_shards(root, {"train": [6, 6], "val": [4]}, corrupt=(2, 7, 13))
    problems = str(tmp_path / "problems.jsonl")
    cfg = DataConfig(shards=root, image_size=8, num_workers=0, shuffle_buffer=3)
    train = build_loader(cfg, DistInfo(), split="train", train=True, batch_size=4, seed=0,
                         problems_path=problems)
    ids = _ids(train)
    assert len(ids) == 12 and not {2, 7} & set(ids)  # replaced by repeats of good samples
    val = build_loader(cfg, DistInfo(), split="val", train=False, batch_size=4, seed=0,
                       problems_path=problems)
    assert _ids(val) == [12, 14, 15]  # eval drops the unreadable sample
    records = [json.loads(line) for line in open(problems)]
    assert sorted(r["key"] for r in records) == ["s0000002", "s0000007", "s0000013"]
    assert all(r["url"].endswith(".tar") and r["error"] for r in records)


def test_resume_mid_epoch_is_exact_in_process(tmp_path):
    write_shards(str(tmp_path), {"train": [9, 14, 2, 11]}, corrupt=(4,))
    for workers in (0, 2):
        cfg = DataConfig(shards=str(tmp_path), image_size=8, num_workers=workers,
                         shuffle_buffer=5)
        make = lambda: build_loader(cfg, DistInfo(), split="train", train=True, batch_size=3,
                                    seed=7)
        whole = make()
        full = [(l.tolist(), x.sum().item()) for x, l in whole]
        for stop in (1, 5, len(full) - 1):
            first = make()
            it = iter(first)
            for _ in range(stop):
                next(it)
            state = first.state_dict()
            assert state["batches"] == stop and state["samples"] == stop * 3
            resumed = make()
            resumed.load_state_dict(state)
            assert [(l.tolist(), x.sum().item()) for x, l in resumed] == full[stop:]


def test_pipe_urls(tmp_path):
    write_shards(str(tmp_path), {"train": [8, 8], "val": [5]})
    cfg = DataConfig(shards=f"pipe:cat {tmp_path}/{{}}", image_size=8, num_workers=0)
    val = build_loader(cfg, DistInfo(), split="val", train=False, batch_size=2, seed=0)
    assert _ids(val) == [16, 17, 18, 19, 20]


def test_too_small_split_and_missing_manifest(tmp_path):
    write_shards(str(tmp_path), {"train": [3]})
    cfg = DataConfig(shards=str(tmp_path), image_size=8, num_workers=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader(cfg, DistInfo(rank=0, world_size=2), split="train", train=True,
                     batch_size=2, seed=0)
    with pytest.raises(ValueError, match="split 'val' not in"):
        build_loader(cfg, DistInfo(), split="val", train=False, batch_size=2, seed=0)
    with pytest.raises(FileNotFoundError, match="ddp-shards pack"):
        build_loader(DataConfig(shards=str(tmp_path / "nope")), DistInfo(), split="train",
                     train=True, batch_size=2, seed=0)


# ------------------------------------------------------------------------ 2 ranks, torchrun

def test_two_ranks_random_uneven_layouts(tmp_path):
    rng = random.Random(2026)
    jobs = []
    shapes = [(40, 1), (57, 13), (33, 33), (71, 5), (26, 2)]  # (samples, max shards)
    for i, (n, max_shards) in enumerate(shapes):
        root = str(tmp_path / f"ds{i}")
        write_shards(root, {"train": random_layout(rng, n, max_shards),
                            "val": random_layout(rng, rng.randint(1, 17), 4)})
        jobs.append(dict(root=root, batch=rng.randint(2, 5), buffer=rng.randint(1, 9),
                         resume_at=rng.randint(1, 1000)))
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    run_torchrun(os.path.join(ROOT, "tests/dist_scripts/loader_check.py"), str(job_file),
                 str(tmp_path / "out"))
    ranks = [read_json(str(tmp_path / f"out-{r}.json")) for r in range(2)]
    for rec0, rec1 in zip(*ranks):
        for rec in (rec0, rec1):
            assert [len(e) for e in rec["epochs"]] == [rec["len"]] * 2
            flat = rec["epochs"][0] + rec["epochs"][1]
            assert rec["resumed"] == flat[rec["resume_at"]:]
        assert rec0["len"] == rec1["len"]  # equal batch counts: no DDP hang
        ids0 = [i for b in rec0["epochs"][0] for i in b[0]]
        ids1 = [i for b in rec1["epochs"][0] for i in b[0]]
        assert not set(ids0) & set(ids1) and len(set(ids0)) == len(ids0)
        val = rec0["val"] + rec1["val"]
        manifest = read_json(os.path.join(rec0["root"], "_info.json"))
        n_train = manifest["splits"]["train"]["num_samples"]
        n_val = manifest["splits"]["val"]["num_samples"]
        assert sorted(val) == list(range(n_train, n_train + n_val))  # exact eval coverage
    # 0 and 2 workers give different batch orders but identical per-sample augmentation
    by_workers = {}
    for rec in ranks[0]:
        by_workers.setdefault(rec["root"], {})[rec["workers"]] = rec
    for recs in by_workers.values():
        assert recs[0]["len"] == recs[2]["len"]
