"""Temperature calibration, TTA, and ``ddp-train eval`` / ``predict`` on a tiny trained run."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, torchrun_env
from ddp_train import calibrate, infer, infer_cli
from ddp_train.config import CalibrationConfig, DataConfig, TTAConfig
from ddp_train.data import build_loader
from ddp_train.dist import DistInfo
from ddp_train.export import export_weights
from ddp_train.metrics import evaluate
from ddp_train.tta import TTAModel, zoom
from shardgen import write_shards
from tinyrun import pack_and_train


def test_calibration_lowers_nll_of_an_overconfident_model():
    torch.manual_seed(0)
    x, w = torch.randn(2000, 6), torch.randn(6, 4)
    # labels drawn from softmax(x @ w): a model with logits 5 * (x @ w) is 5x over-confident
    y = torch.multinomial(torch.softmax(x @ w, dim=1), 1).squeeze(1)
    model = nn.Linear(6, 4, bias=False)
    model.weight.data = 5 * w.T
    logits = model(x).detach()
    rep = calibrate.fit(logits, y, CalibrationConfig())
    assert 4 < rep["temperature"] < 6.5
    assert rep["nll_after"] < 0.7 * rep["nll_before"]
    assert rep["ece_after"] < 0.5 * rep["ece_before"]
    # the LBFGS result is the minimum: no temperature on a fine grid does better
    grid = min(calibrate.nll(logits, y, float(t)) for t in torch.logspace(-1, 2, 300))
    assert rep["nll_after"] <= grid + 1e-6


def test_ece_matches_a_hand_computed_value():
    probs = torch.tensor([[0.95, 0.05], [0.95, 0.05], [0.3, 0.7]])
    targets = torch.tensor([0, 1, 1])
    # bin (0.9, 1]: 2 samples, acc 0.5, conf 0.95; bin (0.6, 0.7]: 1 sample, acc 1, conf 0.7
    expected = 2 / 3 * abs(0.5 - 0.95) + 1 / 3 * abs(1 - 0.7)
    assert calibrate.ece(probs.log(), targets, bins=10) == pytest.approx(expected)


def test_tta_averages_the_views_and_eval_counts_each_sample_once(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 14, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    tta = TTAModel(model, TTAConfig(hflip=True, scales=[1.0, 1.5]))
    x = torch.randn(2, 3, 8, 8)
    views = [x, x.flip(-1), zoom(x, 1.5), zoom(x, 1.5).flip(-1)]
    assert tta.num_views == 4 and tta(x).shape == (2, 14)
    assert torch.allclose(tta(x), torch.stack([model(v) for v in views]).mean(0), atol=1e-6)
    assert torch.equal(zoom(x, 2.0), nn.functional.interpolate(x[..., 2:6, 2:6], size=(8, 8),
                                                                mode="bilinear"))
    # multimodal inputs: only the image is transformed, the rest passes through
    seen = []
    probe = TTAModel(nn.Module(), TTAConfig(hflip=True))
    probe.model.forward = lambda d: seen.append(d["sensor"]) or d["image"].mean((1, 2, 3))[:, None]
    probe({"image": x, "sensor": torch.ones(2, 5)})
    assert len(seen) == 2 and all(torch.equal(s, torch.ones(2, 5)) for s in seen)
    # evaluate() over uneven shards with the TTA model: every sample exactly once
    write_shards(str(tmp_path), {"test": [5, 3, 6]}, size=8)
    loader = build_loader(DataConfig(shards=str(tmp_path), image_size=8, num_workers=2),
                          DistInfo(), split="test", train=False, batch_size=4, seed=0)
    recorder = calibrate.LogitRecorder(nn.CrossEntropyLoss())
    metrics = evaluate(tta, loader, recorder, num_classes=14, class_names=None,
                       device=torch.device("cpu"), dist=DistInfo())
    logits, targets = recorder.local()
    assert metrics["count"] == 14 and logits.shape == (14, 14)
    assert sorted(targets.tolist()) == list(range(14))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """A 2-class image folder packed, trained 6 steps with calibration and TTA at test."""
    return pack_and_train(str(tmp_path_factory.mktemp("infer")), {"a": 10, "b": 10}, (20, 20),
                          ["train.max_steps=6", "calibration.enabled=true", "tta.at_test=true",
                           "tta.scales=[1.0,1.2]"])


def test_eval_cli_reports_metrics_with_the_stored_temperature(run, tmp_path, capsys):
    out = str(tmp_path / "m.json")
    assert infer_cli.main("eval", [run["dir"], "--shards", run["shards"], "--tta", "--workers", "0",
                               "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "macro_f1" in printed and "ece" in printed
    m = json.load(open(out))
    last = os.path.join(run["dir"], "checkpoints", "last.pt")
    side = json.load(open(last + ".json"))
    assert m["count"] == split_size(run, "test") and len(m["per_class"]) == 2 and m["tta_views"] == 4
    assert m["temperature"] == side["temperature"] == run["result"]["calibration"]["temperature"]
    assert state_temperature(last) == side["temperature"]  # also in the checkpoint itself
    assert m["acc"] == pytest.approx(run["result"]["test"]["acc"])  # as training's final eval
    assert m["nll"] == pytest.approx(run["result"]["test"]["loss"], rel=1e-4)
    # export-weights output carries what eval needs; without TTA the same checkpoint still loads
    weights = export_weights(run["dir"], str(tmp_path / "w.pt"))
    m2 = infer.evaluate_checkpoint(weights, run["shards"], workers=0)
    assert m2["temperature"] == m["temperature"] and m2["tta_views"] == 1


def split_size(run: dict, split: str) -> int:
    return json.load(open(os.path.join(run["shards"], "_info.json")))["splits"][split]["num_samples"]


def state_temperature(path: str) -> float:
    return torch.load(path, weights_only=True)["calibration"]["temperature"]


def test_predict_cli_writes_one_row_per_image_or_sample(run, tmp_path):
    out = str(tmp_path / "p.csv")
    assert infer_cli.main("predict", [run["dir"], run["images"], "--out", out, "--tta"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 20 and list(rows[0])[:2] == ["path", "label"]
    for row in rows:
        probs = {c: float(row[f"prob_{c}"]) for c in ("a", "b")}
        assert sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert row["label"] == max(probs, key=probs.get)
    assert infer_cli.main("predict", [run["dir"], "--shards", run["shards"], "--split", "val",
                                  "--out", out]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == split_size(run, "val") and {r["target"] for r in rows} <= {"a", "b"}
    assert len({r["key"] for r in rows}) == len(rows)


def test_cli_bad_paths_are_one_line_errors(run, tmp_path):
    cmd = [sys.executable, "-m", "ddp_train", "eval", str(tmp_path / "nope"), "--shards",
           run["shards"]]
    proc = subprocess.run(cmd, env=torchrun_env(), capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr
    for argv in (["eval", run["dir"], "--shards", str(tmp_path / "none")],
                 ["predict", run["dir"], str(tmp_path / "missing.png")],
                 ["predict", run["dir"], "--shards", run["shards"], "--split", "nosuch"]):
        assert infer_cli.main(argv[0], argv[1:]) == 2
