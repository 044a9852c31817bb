"""``ddp-train eval/predict --ensemble``: three tiny members (two architectures, two image sizes)
against averages of their single-model probabilities computed by hand (one process, CPU)."""
from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch

from ddp_train import infer, infer_cli
from ddp_train.config import load_config
from ddp_train.dist import DistInfo
from ddp_train.ensemble import Ensemble, evaluate_ensemble, image_source, shard_source
from ddp_train.metrics import ConfusionMatrix
from ddp_train.shards.pack import pack
from ddp_train.trainer import train
from helpers_images import make_image_folder

CLASSES = ["a", "b", "c"]
# (model, image size, seed, extra overrides): members differ in architecture and eval transform
MEMBERS = [("resnet10t", 32, 0, ["calibration.enabled=true"]),  # a fitted temperature != 1
           ("resnet10t", 40, 1, ["tta.scales=[1.0,1.2]"]),
           ("test_efficientnet", 32, 2, [])]


@pytest.fixture(scope="module")
def ens(tmp_path_factory) -> dict:
    """A 3-class image folder, packed, and one 4-step run per member of MEMBERS."""
    root = tmp_path_factory.mktemp("ensemble")
    images = str(root / "images")
    make_image_folder(images, {c: 8 for c in CLASSES}, size=(24, 24), corrupt=False)
    shards = str(root / "shards")
    pack(images, shards, workers=1, progress="none", val_fraction=0.25, test_fraction=0.4)
    torch.set_num_threads(1)
    runs = []
    for i, (model, size, seed, extra) in enumerate(MEMBERS):
        run_dir = str(root / f"m{i}")
        cfg = load_config(None, [f"data.shards={shards}", f"run.path={run_dir}",
                                 f"model.name={model}", f"data.image_size={size}", f"seed={seed}",
                                 "data.num_workers=0", "train.batch_size=4", "train.max_steps=4",
                                 "eval.test_at_end=false", "log.progress=none", *extra])
        train(cfg, DistInfo())
        runs.append(run_dir)
    return {"images": images, "shards": shards, "runs": runs, "root": root}


def single_model_probs(run: str, source) -> dict[str, torch.Tensor]:
    """Sample key -> probabilities by the single-model ``predict`` code path (its model, its
    stored temperature, its batching), exact rather than rounded to the CSV's 6 decimals."""
    loaded = infer.load_checkpoint(run, "cpu")
    model = infer.inference_model(loaded, None, loaded.temperature)
    out = {}
    for ids, logits in infer.batch_logits(loaded, model, source(loaded), batch_size=5):
        for sample, p in zip(ids, torch.softmax(logits.double(), dim=1)):
            out[sample.get("key", sample.get("path"))] = p
    return out


def hand_average(ens: dict, source, weights: list[float]) -> dict[str, torch.Tensor]:
    per_member = [single_model_probs(run, source) for run in ens["runs"]]
    total = sum(weights)
    return {k: sum(w / total * probs[k] for w, probs in zip(weights, per_member))
            for k in per_member[0]}


def test_eval_equals_the_hand_average_of_single_model_probabilities(ens, tmp_path, capsys):
    source = shard_source(ens["shards"], "test")
    expected = hand_average(ens, source, [0.5, 0.3, 0.2])
    targets = {ids["key"]: CLASSES.index(ids["target"]) for ids, _ in
               source(infer.load_checkpoint(ens["runs"][0], "cpu"))}
    out = str(tmp_path / "m.json")
    assert infer_cli.main("eval", ["--ensemble", *ens["runs"], "--shards", ens["shards"],
                               "--weights", "5,3,2", "--members", "--out", out]) == 0
    m = json.load(open(out))
    keys = sorted(expected)
    matrix = ConfusionMatrix(3)
    matrix.update(torch.stack([expected[k] for k in keys]),
                  torch.tensor([targets[k] for k in keys]))
    hand = matrix.summary(CLASSES)
    assert m["count"] == len(keys) == len(targets)
    assert m["confusion_matrix"] == hand["confusion_matrix"]  # every prediction, exactly
    assert m["acc"] == hand["acc"] and m["macro_f1"] == hand["macro_f1"]
    nll = -sum(float(expected[k][targets[k]].log()) for k in keys) / len(keys)
    assert m["nll"] == pytest.approx(nll, rel=1e-6)
    assert [e["weight"] for e in m["members"]] == pytest.approx([0.5, 0.3, 0.2])
    # --members: each member's metrics are its single-model eval's on the same samples
    for entry, run in zip(m["members"], ens["runs"]):
        single = infer.evaluate_checkpoint(run, ens["shards"], workers=0)
        assert entry["acc"] == pytest.approx(single["acc"]) and entry["count"] == single["count"]
        assert entry["nll"] == pytest.approx(single["nll"], rel=1e-4)
        assert entry["temperature"] == single["temperature"]
    assert m["members"][0]["temperature"] != 1.0  # the calibrated member's own temperature
    printed = capsys.readouterr().out
    assert all(run in printed for run in ens["runs"]) and "macro_f1" in printed


def test_weights_move_the_ensemble_as_expected(ens):
    source = shard_source(ens["shards"], "test")
    loaded = [infer.load_checkpoint(run, "cpu") for run in ens["runs"]]
    only_second = Ensemble(loaded, [0, 1, 0]).probabilities(source)
    assert torch.allclose(only_second.probs, only_second.member_probs[1])
    equal = Ensemble(loaded).probabilities(source)
    assert torch.allclose(equal.probs, equal.member_probs.mean(0))
    skewed = Ensemble(loaded, [1, 1, 6]).probabilities(source)
    expected = hand_average(ens, source, [1, 1, 6])
    got = {ids["key"]: p for ids, p in zip(skewed.ids, skewed.probs)}
    assert got.keys() == expected.keys()
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in got)
    assert not torch.allclose(skewed.probs, equal.probs)
    # --tta: each member with its own config's views (member 2 has two scales: 2 x 2 views)
    tta = Ensemble(loaded, tta=True)
    assert [m.tta_views for m in tta.members] == [2, 4, 2]
    assert tta.probabilities(source).probs.shape == equal.probs.shape


def test_predict_on_image_files_with_members(ens, tmp_path, capsys):
    out = str(tmp_path / "p.csv")
    # the members end at the first path that is no checkpoint: here the image folder
    assert infer_cli.main("predict", ["--ensemble", *ens["runs"], ens["images"], "--weights",
                                  "1,2,1", "--members", "--out", out]) == 0
    rows = list(csv.DictReader(open(out)))
    expected = hand_average(ens, image_source([ens["images"]]), [1, 2, 1])
    assert len(rows) == 24 and {r["path"] for r in rows} == set(expected)
    assert list(rows[0])[-6:] == ["m1_label", "m1_prob", "m2_label", "m2_prob", "m3_label",
                                  "m3_prob"]
    for row in rows:
        probs = torch.tensor([float(row[f"prob_{c}"]) for c in CLASSES], dtype=torch.float64)
        assert torch.allclose(probs, expected[row["path"]], atol=2e-6)
        assert row["label"] == CLASSES[int(expected[row["path"]].argmax())]
        assert all(row[f"m{i}_label"] in CLASSES and 0 < float(row[f"m{i}_prob"]) <= 1
                   for i in (1, 2, 3))
    legend = capsys.readouterr().err
    assert all(f"m{i}: {run}" in legend for i, run in enumerate(ens["runs"], 1))
    # the same with `--` or with the images first; one file, from --shards
    opts = ["--weights", "1,2,1", "--out", out]
    for argv in ([*opts, "--ensemble", *ens["runs"], "--", ens["images"]],
                 [ens["images"], *opts, "--ensemble", *ens["runs"]]):
        assert infer_cli.main("predict", argv) == 0
        again = list(csv.DictReader(open(out)))
        assert [r["label"] for r in again] == [r["label"] for r in rows]
    assert infer_cli.main("predict", ["--ensemble", *ens["runs"][:2], "--shards", ens["shards"],
                                  "--split", "val", "--out", out]) == 0
    assert {r["target"] for r in csv.DictReader(open(out))} <= set(CLASSES)


def test_class_list_mismatch_and_bad_weights_are_one_line_errors(ens, tmp_path, capsys):
    # a copy of member 1 whose sidecar lists the classes in another order
    last = os.path.join(ens["runs"][0], "checkpoints", "last.pt")
    swapped = str(tmp_path / "swapped.pt")
    shutil.copy(last, swapped)
    meta = json.load(open(last + ".json"))
    meta["classes"] = ["a", "c", "b"]
    json.dump(meta, open(swapped + ".json", "w"))
    capsys.readouterr()
    assert infer_cli.main("eval", ["--ensemble", ens["runs"][1], swapped, "--shards",
                               ens["shards"]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and ens["runs"][1] in err and swapped in err
    assert "class 1 is 'b' in the first and 'c' in the second" in err
    for weights, words in (("1,2", "2 weights for 3"), ("1,-1,1", "-1"), ("0,0,0", "all"),
                           ("1,x,1", "comma-separated")):
        assert infer_cli.main("eval", ["--ensemble", *ens["runs"], "--shards", ens["shards"],
                                   "--weights", weights]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err, err
    assert infer_cli.main("predict", ["--ensemble", *ens["runs"], ens["images"], "--weights",
                                  "1,1"]) == 2
    assert "2 weights for 3" in capsys.readouterr().err
    assert infer_cli.main("eval", [ens["runs"][0], "--shards", ens["shards"], "--members"]) == 2


def test_members_must_score_the_same_samples_once_each(ens):
    """Matching is by key: a sample one member dropped, or a key seen twice, is an error."""
    loaded = [infer.load_checkpoint(run, "cpu") for run in ens["runs"][:2]]
    source = shard_source(ens["shards"], "test")

    def drops_one(member):  # the second member skips the first sample (e.g. unreadable for it)
        samples = list(source(member))
        return samples[1:] if member is loaded[1] else samples

    with pytest.raises(infer.InferenceError, match="scored different samples"):
        Ensemble(loaded).probabilities(drops_one)
    with pytest.raises(infer.InferenceError, match="scored twice"):
        Ensemble(loaded).probabilities(lambda member: [*source(member)] * 2)
    # a different order is fine: rows are matched by key, the output follows the first member
    reverse = Ensemble(loaded).probabilities(
        lambda member: list(source(member))[::1 if member is loaded[0] else -1])
    plain = Ensemble(loaded).probabilities(source)
    assert [s["key"] for s in reverse.ids] == [s["key"] for s in plain.ids]
    assert torch.allclose(reverse.probs, plain.probs, atol=1e-6)


def test_fit_temperature_refits_each_member_as_single_model_eval_does(ens):
    m = evaluate_ensemble(ens["runs"][1:], ens["shards"], fit_split="val", members=True)
    for entry, run in zip(m["members"], ens["runs"][1:]):
        single = infer.evaluate_checkpoint(run, ens["shards"], fit_split="val", workers=0)
        assert entry["temperature"] == pytest.approx(single["temperature"], rel=1e-3)
        assert entry["nll"] == pytest.approx(single["nll"], rel=1e-3)
