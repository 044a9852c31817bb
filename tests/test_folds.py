"""k-fold cross-validation: folds assigned at pack time (one fold per shard set) and data.fold.

CPU, tiny: one image folder packed a few times, one in-process training run on a fold, one
2-rank torchrun run, and the ``ddp-train`` entry point (in process) for the error contract.
"""
from __future__ import annotations

import csv
import json
import os
import re

import pytest
import webdataset as wds

from conftest import run_torchrun
from helpers_images import make_image_folder
from ddp_train.__main__ import main as train_main
from ddp_train.config import ConfigError, load_config
from ddp_train.data import build_loader
from ddp_train.dist import DistInfo
from ddp_train.shards.__main__ import main as shards_main
from ddp_train.shards.folds import fold_view
from ddp_train.shards.manifest import INFO_NAME, load_manifest
from ddp_train.shards.pack import pack
from ddp_train.trainer import train

CLASSES = {"a": 14, "b": 11, "c": 8}
FAST = dict(shard_size=4, workers=1, progress="none")


def paths_of(root: str, filenames: list[str]) -> list[str]:
    """Source paths of every sample in these shards, in order (read back with webdataset)."""
    return [json.loads(s["json"])["path"] for f in filenames
            for s in wds.WebDataset(os.path.join(root, f), shardshuffle=False)]


def fold_paths(manifest) -> list[set[str]]:
    return [set(paths_of(manifest.root, f["filenames"])) for f in manifest.folds["folds"]]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("src") / "imgs")
    make_image_folder(root, CLASSES, size=(24, 20), corrupt=False)
    return root


@pytest.fixture(scope="module")
def folded(src, tmp_path_factory):
    """The folder packed with 3 folds and a test split (no val: each fold is a val)."""
    return pack(src, str(tmp_path_factory.mktemp("out") / "cv"), folds=3, test_fraction=0.2,
                seed=5, **FAST)


def test_folds_are_disjoint_stratified_whole_shards_covering_train(folded):
    m = folded
    doc = json.load(open(os.path.join(m.root, INFO_NAME)))
    record = doc["folds"]
    assert (record["num_folds"], record["seed"], record["split"], record["explicit"]) == (
        3, 5, "train", 0)
    assert doc["pack"]["folds"] == 3 and doc["pack"]["val_fraction"] == 0.0
    assert m.splits["val"].num_samples == 0  # with folds, fold k is the val split
    folds = record["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    for k, f in enumerate(folds):  # a fold is a set of whole shards of its own
        assert all(re.fullmatch(rf"train-f{k}-\d{{6}}\.tar", n) for n in f["filenames"])
        assert f["num_samples"] == sum(f["shard_lengths"]) == sum(f["class_counts"])
    # The whole train split, as timm's ReaderWds reads it: the folds' shards end to end.
    train = m.splits["train"]
    assert train.filenames == [n for f in folds for n in f["filenames"]]
    assert train.shard_lengths == [n for f in folds for n in f["shard_lengths"]]
    assert train.class_counts == [sum(c) for c in zip(*(f["class_counts"] for f in folds))]
    sets = fold_paths(m)
    assert sum(map(len, sets)) == train.num_samples and not (sets[0] & sets[1] or
                                                            sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(paths_of(m.root, train.filenames))
    assert not set().union(*sets) & set(paths_of(m.root, m.splits["test"].filenames))
    for c in range(len(CLASSES)):  # stratified: per-class counts differ by at most 1
        counts = [f["class_counts"][c] for f in folds]
        assert max(counts) - min(counts) <= 1, (c, counts)
    for k, f in enumerate(folds):  # the recorded counts are what the shards hold
        labels = [os.path.basename(os.path.dirname(p)) for p in paths_of(m.root, f["filenames"])]
        assert [labels.count(c) for c in CLASSES] == f["class_counts"], k


def test_same_seed_same_folds_other_fold_seed_other_folds(src, folded, tmp_path):
    again = pack(src, str(tmp_path / "again"), folds=3, test_fraction=0.2, seed=5, **FAST)
    assert fold_paths(again) == fold_paths(folded)
    assert again.splits["train"].sha256 == folded.splits["train"].sha256  # byte-identical
    other = pack(src, str(tmp_path / "other"), folds=3, test_fraction=0.2, seed=5, fold_seed=6,
                 **FAST)
    assert set().union(*fold_paths(other)) == set().union(*fold_paths(folded))  # same train
    assert fold_paths(other) != fold_paths(folded)


def write_csv(path, rows) -> str:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return str(path)


def test_csv_fold_column_wins_and_is_validated(src, tmp_path, capsys):
    files = sorted(os.path.join(src, c, f) for c in CLASSES
                   for f in os.listdir(os.path.join(src, c)))
    forced = {files[0]: 2, files[1]: 2, files[20]: 0}  # explicit folds; the rest are assigned
    rows = [("path", "label", "split", "fold")]
    rows += [(p, os.path.basename(os.path.dirname(p)), "", forced.get(p, "")) for p in files]
    table = write_csv(tmp_path / "labels.csv", rows)
    out = str(tmp_path / "csv")
    assert shards_main(["pack", table, "--out", out, "--folds", "3", "--test-fraction", "0",
                        "--workers", "1", "--shard-size", "5"]) == 0
    assert "train in 3 folds" in capsys.readouterr().out
    m = load_manifest(out)
    sets = fold_paths(m)
    assert m.folds["explicit"] == 3 and sum(map(len, sets)) == len(files)
    assert all(p in sets[k] for p, k in forced.items())
    # Without --folds, K is inferred from the column (largest value + 1).
    inferred = pack(table, str(tmp_path / "inferred"), test_fraction=0, **FAST)
    assert inferred.folds["num_folds"] == 3 and fold_paths(inferred) == sets

    def refused(rows, *args: str) -> str:
        status = shards_main(["pack", write_csv(tmp_path / "bad.csv", rows), "--out",
                              str(tmp_path / "bad"), "--workers", "1", *args])
        err = capsys.readouterr().err
        assert status == 2 and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(tmp_path / "bad")
        return err

    head, first = rows[:1], rows[1]
    assert "outside [0, 3)" in refused(head + [first[:3] + (3,)] + rows[2:], "--folds", "3")
    assert "not an integer" in refused(head + [first[:3] + ("x",)] + rows[2:])
    assert "only train samples are folded" in refused(head + [first[:2] + ("test", 1)] + rows[2:])
    assert "split val" in refused(head + [first[:2] + ("val", "")] + rows[2:], "--folds", "3")
    assert "val fraction 0.1" in refused(rows, "--folds", "3", "--val-fraction", "0.1")
    assert "at least 2" in refused(rows, "--folds", "1")


def test_info_shows_a_line_per_fold(folded, capsys):
    assert shards_main(["info", folded.root]) == 0
    out = capsys.readouterr().out
    assert "3 folds of train (seed 5)" in out
    table = out[out.index("3 folds of train"):]
    rows = [[c.strip() for c in re.split(r"[│|]", line) if c.strip()]
            for line in table.splitlines()]
    rows = [r for r in rows if r and r[0].isdigit()]  # fold | shards | samples | class counts
    assert rows == [[str(f["fold"]), str(len(f["filenames"])), str(f["num_samples"]),
                     ", ".join(f"{c} {n}" for c, n in zip(CLASSES, f["class_counts"]))]
                    for f in folded.folds["folds"]]


def test_fold_view_and_loader_resume_on_a_fold(folded):
    folds = folded.folds["folds"]
    view = fold_view(folded, 1)
    assert view.splits["val"].filenames == folds[1]["filenames"]
    assert view.splits["train"].filenames == folds[0]["filenames"] + folds[2]["filenames"]
    assert view.splits["train"].num_samples == folds[0]["num_samples"] + folds[2]["num_samples"]
    assert view.splits["test"] == folded.splits["test"] and fold_view(folded, -1) is folded
    # build_loader applies data.fold to the manifest it loads; resume mid-epoch stays exact.
    cfg = load_config(None, [f"data.shards={folded.root}", "data.fold=1", "data.image_size=8",
                             "data.num_workers=0", "data.shuffle_buffer=3"]).data
    make = lambda: build_loader(cfg, DistInfo(), split="train", train=True, batch_size=2, seed=3)
    whole = make()
    assert whole.num_samples == view.splits["train"].num_samples
    full = [(y.tolist(), x.sum().item()) for x, y in whole]
    first = make()
    it = iter(first)
    for _ in range(3):
        next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert [(y.tolist(), x.sum().item()) for x, y in resumed] == full[3:]
    val = build_loader(cfg, DistInfo(), split="val", train=False, batch_size=4, seed=0)
    assert val.num_samples == folds[1]["num_samples"]


def test_train_on_a_fold_validates_exactly_on_it(folded, tmp_path):
    cfg = load_config(None, [f"data.shards={folded.root}", "data.fold=1",
                             f"run.path={tmp_path / 'run'}", "data.image_size=32",
                             "data.num_workers=0", "train.batch_size=4", "train.max_steps=3",
                             "eval.every_steps=3", "eval.every_epoch=false",
                             "log.progress=none"])
    result = train(cfg, DistInfo())
    folds = folded.folds["folds"]
    with open(os.path.join(result["run_dir"], "metrics.jsonl")) as f:
        start = next(r for r in map(json.loads, f) if r.get("event") == "start")
    assert start["train_samples"] == folds[0]["num_samples"] + folds[2]["num_samples"]
    with open(os.path.join(result["run_dir"], "eval.jsonl")) as f:
        evals = [json.loads(line) for line in f]
    val = [e for e in evals if e["split"] == "val"]
    assert val and all(e["count"] == folds[1]["num_samples"] for e in val)
    # every sample of fold 1 once: the per-class support is fold 1's class counts
    assert [c["support"] for c in val[-1]["per_class"]] == folds[1]["class_counts"]
    test = [e for e in evals if e["split"] == "test"]
    assert test and test[-1]["count"] == folded.splits["test"].num_samples


def test_bad_fold_settings_are_one_line_errors(src, folded, tmp_path, capsys):
    for overrides, words in ((["data.fold=-2"], "data.fold: -2 is not a fold"),
                             (["data.fold=0", "data.val_split=test"], "data.fold: trains on")):
        with pytest.raises(ConfigError, match=words):
            load_config(None, overrides)
    plain = pack(src, str(tmp_path / "plain"), **FAST)
    cfg = load_config(None, [f"data.shards={plain.root}", "data.fold=0",
                             f"run.path={tmp_path / 'r1'}", "log.progress=none"])
    with pytest.raises(ConfigError, match=r"^data\.fold: .* packed without folds"):
        train(cfg, DistInfo())
    # The ddp-train entry point: fold >= K is one line on stderr and exit status 2.
    status = train_main([f"data.shards={folded.root}", "data.fold=3",
                         f"run.path={tmp_path / 'r2'}", "log.progress=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("ddp-train: error: data.fold: 3 is out of range: "), err


def test_two_ranks_validate_each_sample_of_the_fold_once(folded, tmp_path):
    """The one real 2-rank run: both ranks apply data.fold=2; eval sums to fold 2 exactly."""
    run = tmp_path / "ddp"
    run_torchrun("ddp_train", f"data.shards={folded.root}", "data.fold=2", f"run.path={run}",
                 "data.image_size=32", "data.num_workers=0", "train.batch_size=4",
                 "train.max_steps=1", "eval.every_steps=1", "eval.every_epoch=false",
                 "eval.test_at_end=false", "log.progress=none", extra=("-m",))
    fold = folded.folds["folds"][2]
    with open(run / "eval.jsonl") as f:
        val = [e for e in map(json.loads, f) if e["split"] == "val"]
    assert val and all(e["count"] == fold["num_samples"] for e in val)
    assert [c["support"] for c in val[-1]["per_class"]] == fold["class_counts"]
