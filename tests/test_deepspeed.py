"""DeepSpeed engine on CPU with real DeepSpeed, 2 ranks under torchrun (gloo).

ZeRO 0/2/3 against DDP on the same seed, bf16 on a BatchNorm model, config conflicts, and the
trainer end to end: ZeRO-2 checkpoints, exact resume, export-weights into timm.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch

from conftest import ROOT, read_json, run_torchrun, torchrun_env
from ddp_train.config import ConfigError
from ddp_train.demo import ensure_digits
from ddp_train.dist import DistInfo
from ddp_train.engine.deepspeed_engine import deepspeed_config
from ddp_train.export import export_weights

pytest.importorskip("deepspeed")
OWNED = dict(batch_size=8, grad_accum=2, clip_grad=1.0, precision="bf16", world_size=2)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("shards") / "digits")
    ensure_digits(root, DistInfo())
    return root


def test_zero_stages_train_like_ddp(tmp_path):
    result = tmp_path / "result.json"
    run_torchrun(os.path.join(ROOT, "tests", "dist_scripts", "engine_deepspeed.py"), str(result))
    r = read_json(str(result))
    ddp = r["ddp"]
    assert r["world_size"] == 2 and ddp["losses"][-1] < 0.8 * ddp["losses"][0]
    for stage in ("zero0", "zero2", "zero3", "zero2_offload"):
        ds = r[stage]
        assert ds["engine"] == "deepspeed" and ds["lrs"] == ddp["lrs"]  # timm schedule applied
        assert ds["losses"] == pytest.approx(ddp["losses"], rel=1e-4), stage
        assert ds["grad_norms"] == pytest.approx(ddp["grad_norms"], rel=1e-4), stage
    bf16 = r["zero2_bf16"]  # test_resnet has BatchNorm: DeepSpeed's bf16 casts only params
    assert bf16["param_dtype"] == "torch.bfloat16"
    assert bf16["losses"] == pytest.approx(ddp["losses"], abs=0.05)
    assert bf16["losses"][-1] < 0.8 * bf16["losses"][0]


def test_owned_keys_are_filled_in_and_conflicts_name_both_keys():
    ds = deepspeed_config({"zero_optimization": {"stage": 3}, "bf16": {"immediate_grad_update":
                                                                       True}}, **OWNED)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"],
            ds["train_batch_size"], ds["gradient_clipping"]) == (8, 2, 32, 1.0)
    assert ds["bf16"] == {"immediate_grad_update": True, "enabled": True}
    assert ds["fp16"] == {"enabled": False} and ds["zero_optimization"] == {"stage": 3}
    assert deepspeed_config({"train_batch_size": 32}, **OWNED)["train_batch_size"] == 32  # agrees
    for block, keys in [({"train_micro_batch_size_per_gpu": 4}, ("train_micro", "train.batch_size")),
                        ({"gradient_accumulation_steps": 1}, ("gradient_acc", "train.grad_accum")),
                        ({"train_batch_size": 64}, ("train_batch_size", "world size")),
                        ({"gradient_clipping": 0.5}, ("gradient_clipping", "train.clip_grad")),
                        ({"fp16": {"enabled": True}}, ("fp16.enabled", "engine.precision")),
                        ({"bf16": {"enabled": False}}, ("bf16.enabled", "engine.precision")),
                        ({"optimizer": {"type": "Adam"}}, ("deepspeed.optimizer", "optim.*"))]:
        with pytest.raises(ConfigError) as e:
            deepspeed_config(block, **OWNED)
        assert all(k in str(e.value) for k in keys) and "\n" not in str(e.value), block


def test_conflict_on_the_command_line_is_exit_2_one_line(digits, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ddp_train", f"data.shards={digits}",
                           f"run.path={tmp_path / 'run'}", "engine.name=deepspeed",
                           "train.batch_size=16",
                           "engine.deepspeed.train_micro_batch_size_per_gpu=8"],
                          capture_output=True, text=True, env=torchrun_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "ddp-train: error: engine.deepspeed.train_micro_batch_size_per_gpu=8 conflicts with "
        "train.batch_size (= 16); remove it from engine.deepspeed"]


def _train(digits: str, run: str, *extra: str) -> None:
    run_torchrun("-m", "ddp_train", f"data.shards={digits}", f"run.path={run}",
                 "model.name=test_resnet", "engine.name=deepspeed",
                 "engine.deepspeed.zero_optimization.stage=2", "train.max_steps=12",
                 "checkpoint.every_steps=6", "checkpoint.keep_last=5", "eval.every_steps=6",
                 "eval.test_at_end=false", "log.progress=none", "data.num_workers=1", *extra)


def _records(run: str, name: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run, name), encoding="utf-8")]


def test_checkpoint_resume_and_export(digits, tmp_path):
    """ZeRO-2 run to step 12; a second run resumed from its step-6 checkpoint must log the same
    losses and evals and end with the same weights; both export into timm."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    _train(digits, first)
    ckpts = os.path.join(first, "checkpoints")
    meta = read_json(os.path.join(ckpts, "step_00000006.json"))
    assert meta["engine"] == "deepspeed" and meta["step"] == 6 and meta["world_size"] == 2
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(meta["files"])
    assert {"scheduler", "loader", "rng", "early_stop", "step"} <= set(meta["keys"])
    assert os.path.isdir(os.path.join(ckpts, "last")) and os.path.isdir(os.path.join(ckpts, "best"))
    assert not [n for n in os.listdir(ckpts) if n.startswith(".")]  # no temp folders left

    _train(digits, second, "--resume", os.path.join(ckpts, "step_00000006"))
    losses = [{r["step"]: r["loss"] for r in _records(run, "metrics.jsonl") if "loss" in r}
              for run in (first, second)]
    assert sorted(losses[1]) == list(range(7, 13))
    assert all(losses[1][s] == pytest.approx(losses[0][s], rel=1e-6) for s in losses[1])
    evals = [[r for r in _records(run, "eval.jsonl") if r["step"] == 12] for run in (first, second)]
    assert evals[0][0]["loss"] == pytest.approx(evals[1][0]["loss"], rel=1e-6)  # same BN stats

    # export-weights: CLI on the run folder, API on the resumed run's checkpoint folder.
    proc = subprocess.run([sys.executable, "-m", "ddp_train", "export-weights", first],
                          capture_output=True, text=True, env=torchrun_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    exported = proc.stdout.strip().splitlines()[-1]
    assert exported == os.path.join(ckpts, "last.weights.pt")
    other = export_weights(os.path.join(second, "checkpoints", "last"), str(tmp_path / "w.pt"))
    assert read_json(exported + ".json")["model_name"] == "test_resnet"
    a = timm.create_model("test_resnet", num_classes=10, checkpoint_path=exported).state_dict()
    b = timm.create_model("test_resnet", num_classes=10, checkpoint_path=other).state_dict()
    fresh = timm.create_model("test_resnet", num_classes=10).state_dict()
    assert all(a[k].dtype == fresh[k].dtype and torch.equal(a[k], b[k]) for k in fresh)
    assert not torch.equal(a["fc.weight"], fresh["fc.weight"])  # trained weights, not init


def test_zero3_eval_with_uneven_rank_batches_finishes_exactly(digits, tmp_path):
    """ZeRO-3's forward is collective: ranks with fewer eval batches run padding forwards."""
    out = str(tmp_path / "z3.json")
    run_torchrun(os.path.join(ROOT, "tests", "dist_scripts", "zero3_eval.py"), digits, out,
                 timeout=300)
    assert read_json(out) == {"count": 359, "batches": [1, 2],
                              "collective_forward": True}
