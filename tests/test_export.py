"""``ddp-train export``: ONNX and TorchScript match PyTorch, the JSON reproduces the eval transform,
timm weights load in timm, bad inputs are one-line errors. One tiny run trained in-process."""
from __future__ import annotations

import csv
import dataclasses
import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from ddp_train import __main__ as cli
from ddp_train import calibrate, deploy, infer
from ddp_train import checkpoint as ckpt
from ddp_train.config import load_config
from ddp_train.dist import DistInfo
from ddp_train.export import export, export_weights
from ddp_train.trainer import train
from tinyrun import pack_and_train

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """3 classes of 45x30 images, trained 3 steps with calibration (so the checkpoint has a
    temperature), a non-default eval transform: bicubic, crop_pct 0.875 (resize 36, crop 32)."""
    root = tmp_path_factory.mktemp("export")
    made = pack_and_train(str(root), {"a": 8, "b": 8, "c": 8}, (45, 30),
                          ["data.crop_pct=0.875", "data.interpolation=bicubic",
                           "train.max_steps=3", "calibration.enabled=true",
                           "eval.test_at_end=false"])
    images, shards, run_dir = made["images"], made["shards"], made["dir"]
    loaded = infer.load_checkpoint(run_dir, "cpu")
    # real images as the eval loader decodes and transforms them, from the shards
    inputs = torch.stack([x for _, x in infer._shard_samples(loaded, shards, "train")][:6])
    reference = calibrate.TemperatureScaled(loaded.model, loaded.temperature)
    with torch.no_grad():
        logits = reference(inputs)
    return {"images": images, "shards": shards, "dir": run_dir, "loaded": loaded,
            "inputs": inputs, "logits": logits, "root": str(root)}


@pytest.fixture(scope="module")
def onnx_file(run) -> str:
    lines = []
    out = export(run["dir"], "onnx", os.path.join(run["root"], "model.onnx"), report=lines.append)
    assert len(lines) == 1 and lines[0].startswith("max abs difference vs PyTorch: ")
    assert "(batch 4 and 1;" in lines[0]
    return out


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def test_onnx_matches_pytorch_on_shard_images_with_a_dynamic_batch(run, onnx_file):
    spec = read_json(onnx_file + ".json")
    side = ckpt.read_meta(run["loaded"].path)
    assert spec["schema"] == deploy.SCHEMA and spec["export_format"] == "onnx"
    assert spec["file"] == "model.onnx" and spec["exporter"] == "dynamo" and spec["opset"] >= 18
    assert spec["classes"] == ["a", "b", "c"] and spec["num_classes"] == 3
    assert spec["temperature"] == side["temperature"] and spec["temperature"] != 1.0
    assert spec["output"]["temperature_applied"] and spec["output"]["name"] == "logits"
    checks = spec["checks"]
    assert checks["batches"] == [4, 1] and checks["max_abs_diff"] <= checks["tolerance"]
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, outp.name) == ("input", "logits") and inp.shape[1:] == [3, 32, 32]
    assert isinstance(inp.shape[0], str)  # a symbolic batch dimension
    for n in (5, 1):  # neither is the export's example batch (4)
        got = session.run(None, {"input": run["inputs"][:n].numpy()})[0]
        ref = run["logits"][:n].numpy()
        assert got.shape == (n, 3)
        assert np.abs(got - ref).max() <= deploy.REL_TOL * max(1.0, np.abs(ref).max())


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
def test_torchscript_cli_matches_pytorch(run, tmp_path, capsys):
    out = str(tmp_path / "model.ts.pt")
    assert cli.main(["export", run["dir"], "--format", "torchscript", "--out", out,
                     "--batch-check", "3"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == out  # stdout: the path only
    assert captured.err.startswith("max abs difference vs PyTorch: ")
    assert "(batch 3 and 1;" in captured.err
    spec = read_json(out + ".json")
    assert spec["export_format"] == "torchscript" and spec["checks"]["batches"] == [3, 1]
    model = torch.jit.load(out)
    for n in (5, 1):
        with torch.no_grad():
            got = model(run["inputs"][:n])
        assert (got - run["logits"][:n]).abs().max() <= deploy.REL_TOL * max(
            1.0, float(run["logits"].abs().max()))


# The reference preprocessing, from the JSON alone (PIL + numpy): docs/cv.md has it too.
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def preprocess(path: str, spec: dict) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert("RGB")
    w, h = image.size
    r, s = spec["resize_size"], spec["image_size"]
    size = (r, int(r * h / w)) if w <= h else (int(r * w / h), r)
    if size != (w, h):
        image = image.resize(size, resample=RESAMPLE[spec["interpolation"]])
    top, left = round((size[1] - s) / 2), round((size[0] - s) / 2)
    image = image.crop((left, top, left + s, top + s))
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return x.transpose(2, 0, 1)  # HWC -> CHW


def test_json_preprocessing_reproduces_predict(run, onnx_file, tmp_path):
    spec = read_json(onnx_file + ".json")
    assert (spec["image_size"], spec["resize_size"], spec["crop_pct"]) == (32, 36, 0.875)
    assert spec["interpolation"] == "bicubic" and spec["input"]["layout"] == "NCHW"
    csv_path = str(tmp_path / "preds.csv")
    assert infer.predict(run["dir"], [run["images"]], out=csv_path, device="cpu") == 24
    rows = list(csv.DictReader(open(csv_path, encoding="utf-8")))
    session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    batch = np.stack([preprocess(row["path"], spec) for row in rows])
    logits = session.run(None, {spec["input"]["name"]: batch})[0]
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = [spec["classes"][i] for i in probs.argmax(1)]
    assert labels == [row["label"] for row in rows]
    expected = np.array([[float(row[f"prob_{c}"]) for c in spec["classes"]] for row in rows])
    assert np.abs(probs - expected).max() < 2e-6  # the CSV has 6 decimals


def test_timm_format_loads_in_timm_and_in_eval(run, tmp_path, capsys):
    out = str(tmp_path / "w.pt")
    # the export-weights alias as __main__ registers it
    assert cli.main(["export-weights", run["dir"], "--out", out]) == 0
    assert capsys.readouterr().out.strip() == out
    spec = read_json(out + ".json")
    assert spec["format"] == ckpt.FORMAT and spec["schema"] == deploy.SCHEMA  # both roles
    assert spec["export_format"] == "timm" and spec["checks"] is None
    assert not spec["output"]["temperature_applied"] and spec["temperature"] is not None
    assert (spec["resize_size"], spec["interpolation"]) == (36, "bicubic")
    model = timm.create_model(spec["model_name"], num_classes=spec["num_classes"],
                              checkpoint_path=out)
    trained = run["loaded"].model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert infer.load_checkpoint(out, "cpu").temperature == spec["temperature"]
    assert export_weights(run["dir"], str(tmp_path / "w2.pt")) == str(tmp_path / "w2.pt")


def test_bad_inputs_are_one_line_errors_and_write_nothing(run, tmp_path, capsys, monkeypatch):
    os.makedirs(tmp_path / "empty" / "checkpoints")
    out = str(tmp_path / "out" / "m.onnx")
    os.makedirs(os.path.dirname(out))
    cases = [([str(tmp_path / "nope"), "--format", "onnx"], "no such run folder"),
             ([str(tmp_path / "empty"), "--format", "onnx"], "holds no last checkpoint"),
             ([run["dir"], "--format", "tflite"], "invalid choice: 'tflite'"),
             ([run["dir"]], "--format"),
             ([run["dir"], "--format", "torchscript", "--opset", "18"], "onnx only"),
             ([run["dir"], "--format", "onnx", "--batch-check", "0"], "must be >= 1")]
    for argv, words in cases:
        assert cli.main(["export", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
        assert err.startswith("ddp-train export: error: ")
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime", None)  # "not installed"
    assert cli.main(["export", run["dir"], "--format", "onnx", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ddp-train[onnx]'" in err
    assert os.listdir(os.path.dirname(out)) == []


def test_multimodal_is_refused_and_a_failed_check_exits_1(run, tmp_path, capsys, monkeypatch):
    real = infer.load_checkpoint
    monkeypatch.setattr(infer, "load_checkpoint", lambda path, device: dataclasses.replace(
        real(path, device), inputs={"sensor": {"shape": [4]}}))
    out = str(tmp_path / "m.pt")
    assert cli.main(["export", run["dir"], "--format", "torchscript", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multimodal (FiLM)" in err and "--format timm" in err
    monkeypatch.setattr(infer, "load_checkpoint", real)
    # a tolerance no float32 runtime meets: the check fails, nothing is left behind
    monkeypatch.setattr(deploy, "REL_TOL", -1.0)
    assert cli.main(["export", run["dir"], "--format", "torchscript", "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "above the tolerance" in err
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------ ensembles


@pytest.fixture(scope="module")
def members(run) -> dict:
    """Two more tiny runs on ``run``'s shards: ``same`` shares its eval transform (another
    architecture, no temperature: a 3-step fit hits a bound, T = 100 would flatten its
    probabilities and hide it from the check), ``other`` differs in crop_pct (so resize_size)."""
    runs = {}
    for name, model, extra in [("same", "resnet10t", ["data.crop_pct=0.875",
                                                      "data.interpolation=bicubic"]),
                               ("other", "test_resnet", ["data.crop_pct=1.0"])]:
        runs[name] = os.path.join(run["root"], name)
        cfg = load_config(None, [f"data.shards={run['shards']}", f"run.path={runs[name]}",
                                 f"model.name={model}", "data.image_size=32", "seed=1",
                                 "data.num_workers=0", "train.batch_size=4", "train.max_steps=3",
                                 "log.progress=none", "eval.test_at_end=false", *extra])
        train(cfg, DistInfo())
    return runs


def ensemble_reference(run, members):
    """Shard images and ``ddp_train.ensemble.Ensemble``'s scores of them (weights 3:1), rows
    matched by sample key."""
    from ddp_train.ensemble import Ensemble, shard_source

    ens = Ensemble.load([run["dir"], members["same"]], [3, 1], device="cpu")
    assert ens.temperatures[0] != 1.0 and ens.temperatures[1] == 1.0  # calibrated, not
    scores = ens.probabilities(shard_source(run["shards"], "train"))
    samples = {ids["key"]: x for ids, x in infer._shard_samples(run["loaded"], run["shards"],
                                                                "train")}
    inputs = torch.stack([samples[ids["key"]] for ids in scores.ids])
    return inputs, scores


@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
def test_ensemble_export_equals_the_ensemble_probabilities(run, members, tmp_path, capsys):
    from ddp_train.deploy_ensemble import PROB_ABS_TOL, export_ensemble

    inputs, scores = ensemble_reference(run, members)
    expected = scores.probs
    out = str(tmp_path / "ens.onnx")
    assert cli.main(["export", "--ensemble", run["dir"], members["same"], "--weights", "3,1",
                     "--format", "onnx", "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == out
    assert captured.err.startswith("max abs difference vs PyTorch: ")
    assert "tolerance 1e-05)" in captured.err
    spec = read_json(out + ".json")
    assert spec["schema"] == deploy.SCHEMA and spec["output"]["kind"] == "probabilities"
    assert spec["output"]["name"] == "probabilities" and spec["classes"] == ["a", "b", "c"]
    assert (spec["resize_size"], spec["interpolation"]) == (36, "bicubic")
    assert [m["weight"] for m in spec["members"]] == [0.75, 0.25]
    assert [m["model_name"] for m in spec["members"]] == ["test_resnet", "resnet10t"]
    assert spec["members"][0]["temperature"] == run["loaded"].temperature
    assert [m["temperature_fitted"] for m in spec["members"]] == [True, False]
    assert spec["checks"]["tolerance"] == PROB_ABS_TOL
    assert spec["checks"]["max_abs_diff"] <= PROB_ABS_TOL
    session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["probabilities"]
    got = torch.from_numpy(session.run(None, {"input": inputs.numpy()})[0]).double()
    assert got.shape == expected.shape and len(got) == 12  # not the check's batch sizes
    onnx_diff = float((got - expected).abs().max())
    assert onnx_diff <= PROB_ABS_TOL
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # the tolerance is far below what a lost weight or member changes: the test can fail
    assert float((got - scores.member_probs.mean(0)).abs().max()) > 100 * PROB_ABS_TOL
    assert float((got - scores.member_probs[0]).abs().max()) > 100 * PROB_ABS_TOL

    ts = export_ensemble([run["dir"], members["same"]], "torchscript", str(tmp_path / "e.pt"),
                         weights=[3, 1])
    with torch.no_grad():
        got = torch.jit.load(ts)(inputs).double()
    ts_diff = float((got - expected).abs().max())
    assert ts_diff <= PROB_ABS_TOL
    print(f"ensemble vs Ensemble.probs: onnx {onnx_diff:.3g}, torchscript {ts_diff:.3g}")


def test_ensemble_export_refusals_are_one_line_exit_2(run, members, tmp_path, capsys):
    out = str(tmp_path / "e.onnx")
    a, same, other = run["dir"], members["same"], members["other"]
    cases = [(["--ensemble", a, other, "--format", "onnx"],
              f"ensemble members {a} and {other} have different eval transforms (resize_size "
              f"36 vs 32)"),
             (["--ensemble", a, same, "--format", "timm"], "cannot hold an ensemble"),
             (["--format", "onnx"], "give RUN or --ensemble"),
             ([a, "--ensemble", same, "--format", "onnx"], "give RUN or --ensemble"),
             (["--ensemble", a, same, "--weights", "1,2,3", "--format", "onnx"],
              "3 weights for 2 ensemble members"),
             ([a, "--weights", "1", "--format", "onnx"], "--weights applies to --ensemble")]
    for argv, words in cases:
        assert cli.main(["export", *argv, "--out", out]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert os.listdir(tmp_path) == []
