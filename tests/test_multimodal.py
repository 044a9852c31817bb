"""Multimodal samples: the packer stores CSV extras, the stream yields them (exact, resumable),
and the FiLM model trains with every ablation from configs/conveyor_multimodal_film.yaml."""
from __future__ import annotations

import csv
import json
import os
import tarfile

import numpy as np
import pytest
import torch

from conftest import ROOT
from ddp_train import infer
from ddp_train.config import DataConfig, load_config
from ddp_train.data import build_loader
from ddp_train.dist import DistInfo
from ddp_train.shards.manifest import load_manifest
from ddp_train.shards.pack import pack
from ddp_train.trainer import train
from mmgen import CLASSES, SENSOR_SHAPE, make_multimodal_csv

CONFIG = os.path.join(ROOT, "configs", "conveyor_multimodal_film.yaml")


@pytest.fixture(scope="module")
def mm(tmp_path_factory) -> dict:
    """A packed multimodal dataset (2 rows with a wrong sensor shape) and its source CSV."""
    root = tmp_path_factory.mktemp("mm")
    src = make_multimodal_csv(str(root / "src"), per_class=12, bad_sensor_rows=2)
    shards = str(root / "shards")
    pack(src, shards, extras=["sensor", "env"], classes=list(CLASSES), workers=1,
         progress="none", val_fraction=0.25, test_fraction=0.25)
    return {"csv": src, "shards": shards}


def _source(csv_path: str) -> dict[bytes, tuple[int, list[float]]]:
    """sensor window bytes -> (class index, env vector in manifest key order)."""
    base, out = os.path.dirname(csv_path), {}
    for row in csv.DictReader(open(csv_path)):
        window = np.load(os.path.join(base, row["sensor"])).astype(np.float32)
        env = row["env"]
        env = json.load(open(os.path.join(base, env))) if env.endswith(".json") else json.loads(env)
        out[window.tobytes()] = (CLASSES.index(row["label"]), [env["humidity"], env["temp_c"]])
    return out


def test_packer_writes_extras_and_logs_mismatched_rows(mm):
    manifest = load_manifest(mm["shards"])
    assert manifest.extras == {"sensor": {"member": "sensor.npy", "shape": list(SENSOR_SHAPE)},
                               "env": {"member": "env.json", "keys": ["humidity", "temp_c"]}}
    assert sum(s.num_samples for s in manifest.splits.values()) == 48  # the 2 bad rows skipped
    problems = [json.loads(line) for line in
                open(os.path.join(mm["shards"], "problematic_files.jsonl"))]
    assert [os.path.basename(p["path"]) for p in problems] == ["bad_000.png", "bad_001.png"]
    assert all("shape [3, 7] differs from [2, 32]" in p["reason"] for p in problems)
    with tarfile.open(os.path.join(mm["shards"], manifest.splits["train"].filenames[0])) as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"png", "cls", "json", "sensor.npy", "env.json"}


def test_stream_yields_extras_exactly_and_resumes(mm):
    source = _source(mm["csv"])
    cfg = DataConfig(shards=mm["shards"], image_size=16, num_workers=0, extras=["sensor", "env"])
    seen = []
    for inputs, targets in build_loader(cfg, DistInfo(), split="val", train=False, batch_size=5,
                                        seed=0):
        assert set(inputs) == {"image", "sensor", "env"}
        assert inputs["image"].shape[1:] == (3, 16, 16)
        assert inputs["sensor"].shape[1:] == SENSOR_SHAPE and inputs["env"].shape[1] == 2
        for window, env, target in zip(inputs["sensor"], inputs["env"], targets):
            label, env_src = source[window.numpy().tobytes()]  # stored values round-trip exactly
            assert label == int(target) and env.tolist() == pytest.approx(env_src)
            seen.append(window.numpy().tobytes())
    assert len(seen) == len(set(seen)) == load_manifest(mm["shards"]).splits["val"].num_samples
    # image-only datasets (and configs) are untouched: plain tensors
    plain = DataConfig(shards=mm["shards"], image_size=16, num_workers=0)
    images, _ = next(iter(build_loader(plain, DistInfo(), split="val", train=False,
                                       batch_size=5, seed=0)))
    assert isinstance(images, torch.Tensor)
    # a training epoch resumed after 2 batches yields exactly the batches that were left
    loader = build_loader(cfg, DistInfo(), split="train", train=True, batch_size=4, seed=3)
    full = list(loader)
    resumed = build_loader(cfg, DistInfo(), split="train", train=True, batch_size=4, seed=3)
    resumed.load_state_dict({**loader.state_dict(), "epoch": 0, "batches": 2})
    rest = list(resumed)
    assert len(rest) == len(full) - 2
    for (a, ya), (b, yb) in zip(full[2:], rest):
        assert torch.equal(ya, yb) and all(torch.equal(a[k], b[k]) for k in a)


def _steps(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.mark.parametrize("ablation", ["none", "image_only", "sensor_only", "no_film"])
def test_film_model_trains_with_each_ablation(mm, tmp_path, ablation):
    torch.set_num_threads(1)
    run = str(tmp_path / "run")
    full = ablation == "none"  # the whole recipe once: calibration, TTA test eval, eval CLI
    cfg = load_config(CONFIG, [f"data.shards={mm['shards']}", f"run.path={run}",
                               "model.name=test_resnet", "data.image_size=32",
                               "data.num_workers=0", "train.batch_size=8", "train.epochs=12",
                               "log.progress=none", "optim.lr=3e-3", f"multimodal.ablation={ablation}",
                               f"eval.every_epoch={str(full).lower()}",
                               f"eval.test_at_end={str(full).lower()}",
                               f"calibration.enabled={str(full).lower()}"])
    result = train(cfg, DistInfo())
    losses = [r["loss"] for r in _steps(run) if "loss" in r]
    assert len(losses) == 12 * 2  # 23 train samples, batch 8: 2 updates per epoch
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses
    if not full:
        return
    events = {r["event"]: r for r in _steps(run) if "event" in r}
    assert events["calibration"]["nll_after"] <= events["calibration"]["nll_before"] + 1e-9
    metrics = infer.evaluate_checkpoint(run, mm["shards"], tta=True, workers=0)
    assert metrics["count"] == load_manifest(mm["shards"]).splits["test"].num_samples
    assert metrics["acc"] == pytest.approx(result["test"]["acc"])  # same TTA + T as training's
    assert metrics["temperature"] == pytest.approx(events["calibration"]["temperature"])
