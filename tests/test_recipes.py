"""The configs/ recipes end to end at tiny scale, and the EMA across a resume (one process, CPU)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import ROOT
from helpers_images import make_image_folder
from ddp_train.config import load_config
from ddp_train.dist import DistInfo
from ddp_train.shards.pack import pack
from ddp_train.trainer import train

RECIPES = ["defect_type_128", "convnext_base_384_doc", "resnet18_weighted",
           "efficientnet_b3_weighted"]
# What makes each recipe a recipe, checked before it runs.
EXPECTED = {
    "defect_type_128": dict(image_size=128, batch=32, schedule="step", precision="bf16"),
    "convnext_base_384_doc": dict(image_size=384, model="convnext_base", lr=1.28e-4,
                                  smoothing=0.1, mixup=0.8, ema=0.9999, metric="macro_f1"),
    "resnet18_weighted": dict(model="resnet18", weights="balanced"),
    "efficientnet_b3_weighted": dict(model="efficientnet_b3", weights="balanced"),
}


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory) -> str:
    """7 classes from 28 down to 4 images, packed by the real packer (class counts included)."""
    src = tmp_path_factory.mktemp("src")
    counts = dict(zip("abcdefg", [28, 18, 12, 8, 6, 5, 4]))
    make_image_folder(str(src), counts, size=(24, 20), corrupt=False)
    out = str(tmp_path_factory.mktemp("shards") / "imbalanced")
    pack(str(src), out, val_fraction=0.2, test_fraction=0.15, shard_size=20, workers=1,
         progress="none")
    return out


def _tiny(name: str, shards: str, run_path, *extra: str):
    """The recipe as shipped, shrunk: 32 px, batch 8, 3 updates, one process, CPU."""
    return load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), [
        f"data.shards={shards}", f"run.path={run_path}", "model.num_classes=0",
        "data.image_size=32", "data.num_workers=0", "train.batch_size=8", "train.max_steps=3",
        "eval.batch_size=32", "eval.every_steps=3", "log.progress=none", *extra])


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_runs_end_to_end(name, imbalanced, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"))
    want = EXPECTED[name]
    got = dict(image_size=cfg.data.image_size, batch=cfg.train.batch_size,
               schedule=cfg.schedule.name, precision=cfg.engine.precision, model=cfg.model.name,
               lr=cfg.optim.lr, smoothing=cfg.loss.label_smoothing,
               mixup=cfg.augment.mixup_alpha, ema=cfg.ema.decay, metric=cfg.early_stop.metric,
               weights=cfg.loss.class_weights)
    assert {k: got[k] for k in want} == want
    # ConvNeXt-Base would write ~1.4 GB per checkpoint (weights, EMA, AdamW state): its smallest
    # sibling runs the same code path (LayerNorm, drop-path, timm's ConvNeXt) in a second.
    small = ["model.name=convnext_atto"] if name == "convnext_base_384_doc" else []
    result = train(_tiny(name, imbalanced, tmp_path / "run", *small), DistInfo())
    assert result["step"] == 3 and result["stop_reason"] == "finished 3 updates"
    assert 0 <= result["test"]["acc"] <= 1 and result["test"]["count"] > 0
    with open(os.path.join(result["run_dir"], "eval.jsonl"), encoding="utf-8") as f:
        splits = {json.loads(line)["split"] for line in f}
    assert ({"val", "test", "val_ema", "test_ema"} if cfg.ema.decay else {"val", "test"}) == splits


def test_ema_differs_from_model_and_resumes_exactly(imbalanced, tmp_path):
    """6 updates in one go versus 3 + a resume from the step-3 checkpoint, with EMA, mixup and
    class-balanced sampling on: the final model *and* EMA weights are bit-identical."""
    extra = ("ema.decay=0.8", "augment.mixup_alpha=0.8", "data.class_balance=1.0",
             "train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=5",
             "eval.every_epoch=false", "eval.test_at_end=false", "loss.class_weights=none")
    full = train(_tiny("resnet18_weighted", imbalanced, tmp_path / "full", *extra), DistInfo())
    ckpts = os.path.join(full["run_dir"], "checkpoints")
    resumed = train(_tiny("resnet18_weighted", imbalanced, tmp_path / "resumed", *extra,
                          f"run.resume={os.path.join(ckpts, 'step_00000003.pt')}"), DistInfo())
    assert resumed["step"] == 6
    a = torch.load(os.path.join(ckpts, "last.pt"), weights_only=True)
    b = torch.load(os.path.join(resumed["run_dir"], "checkpoints", "last.pt"), weights_only=True)
    assert a["ema"].keys() == a["model"].keys()
    assert any(not torch.equal(a["ema"][k], a["model"][k]) for k in a["model"])
    for part in ("model", "ema"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), (part, key)
    step3 = torch.load(os.path.join(ckpts, "step_00000003.pt"), weights_only=True)
    assert any(not torch.equal(step3["ema"][k], a["ema"][k]) for k in a["ema"])
