"""Trainer end to end: golden loss, 2-rank torchrun demo run, exact resume, DDP eval, timm export."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from conftest import ROOT, read_json, run_torchrun
from ddp_train.config import load_config
from ddp_train.demo import ensure_digits
from ddp_train.dist import DistInfo
from ddp_train.trainer import train

GOLDEN = os.path.join(ROOT, "tests", "golden", "digits_resnet10t_20steps.txt")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """The demo data packed once for this module (the same packer path the demo uses)."""
    root = str(tmp_path_factory.mktemp("shards") / "digits")
    ensure_digits(root, DistInfo())
    return root


def _records(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def _steps(run_dir: str) -> dict[int, dict]:
    return {r["step"]: r for r in _records(os.path.join(run_dir, "metrics.jsonl"))
            if "loss" in r}


def test_golden_loss(digits, tmp_path):
    """20 fixed-seed steps in one process must reproduce the checked-in loss curve.

    Regenerate after an intended change with ``DDP_TRAIN_UPDATE_GOLDEN=1 pytest -k golden``."""
    torch.set_num_threads(1)  # float reductions depend on the thread split
    cfg = load_config(None, [f"data.shards={digits}", f"run.path={tmp_path / 'run'}",
                             "data.num_workers=0", "train.max_steps=20",
                             "eval.every_epoch=false", "eval.test_at_end=false",
                             "log.progress=none", "seed=123"])
    result = train(cfg, DistInfo())
    losses = {s: r["loss"] for s, r in _steps(result["run_dir"]).items()}
    assert sorted(losses) == list(range(1, 21))
    if os.environ.get("DDP_TRAIN_UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            f.write("# step loss  (tests/test_trainer.py::test_golden_loss)\n")
            f.writelines(f"{s} {losses[s]:.6f}\n" for s in sorted(losses))
    golden = {int(s): float(v) for s, v in (line.split() for line in open(GOLDEN)
                                            if not line.startswith("#"))}
    assert golden.keys() == losses.keys()
    for step, value in golden.items():
        # Tolerance covers CPU instruction-set differences, not behaviour changes. Kernels differ
        # in the last bits between CPUs (AVX2 Intel vs AVX-512 AMD measured: 1e-6 at step 5), and
        # SGD amplifies that ~5x per step after step 10 (1% by step 19). The early steps carry the
        # test: any change of data order, init, augmentation, loss or optimizer moves them by
        # 1e-2 or more.
        tol = dict(abs=1e-3) if step <= 10 else dict(rel=0.03)
        assert losses[step] == pytest.approx(value, **tol), f"step {step}"
    assert losses[20] < losses[1]


@pytest.fixture(scope="module")
def demo_run(digits, tmp_path_factory) -> str:
    """The bundled demo on 2 ranks (torchrun, gloo), with periodic step checkpoints kept."""
    run_dir = str(tmp_path_factory.mktemp("runs") / "demo")
    run_torchrun("-m", "ddp_train", f"data.shards={digits}", f"run.path={run_dir}",
                 "checkpoint.every_steps=20", "checkpoint.keep_last=20", "log.progress=plain",
                 "data.num_workers=1", timeout=600)
    return run_dir


def _split_size(shards: str, split: str) -> int:
    return read_json(os.path.join(shards, "_info.json"))["splits"][split]["num_samples"]


def test_demo_trains_on_two_ranks(demo_run, digits):
    files = set(os.listdir(demo_run))
    assert {"config.yaml", "train.log", "metrics.jsonl", "eval.jsonl", "checkpoints"} <= files
    steps = _steps(demo_run)
    assert sorted(steps) == list(range(1, max(steps) + 1))  # one record per optimizer step
    for key in ("epoch", "loss", "lr", "grad_norm", "samples_per_s", "data_s", "step_s", "time"):
        assert key in steps[1], key
    evals = _records(os.path.join(demo_run, "eval.jsonl"))
    val = [e for e in evals if e["split"] == "val"]
    assert len(val) == 8  # one per epoch
    assert val[-1]["acc"] >= 0.95, val[-1]["acc"]
    # the whole val split, each sample once over 2 ranks
    assert val[-1]["count"] == _split_size(digits, "val")
    test = [e for e in evals if e["split"] == "test"]
    assert len(test) == 1 and test[0]["count"] == _split_size(digits, "test")
    assert len(test[0]["confusion_matrix"]) == 10 and len(test[0]["per_class"]) == 10
    ckpts = os.listdir(os.path.join(demo_run, "checkpoints"))
    assert {"last.pt", "last.pt.json", "best.pt", "best.pt.json"} <= set(ckpts)
    log = open(os.path.join(demo_run, "train.log")).read()
    assert "eval val" in log and "stopped:" in log


def _plain_timm_eval(demo_run: str, digits: str, checkpoint: str, split: str) -> tuple:
    """(summed cross-entropy, correct, count) of a checkpoint loaded into plain timm, one process."""
    import timm

    from ddp_train.config import DataConfig
    from ddp_train.data import build_loader

    path = os.path.join(demo_run, "checkpoints", checkpoint)
    meta = read_json(path + ".json")
    model = timm.create_model(meta["model_name"], num_classes=meta["num_classes"],
                              checkpoint_path=path).eval()
    loader = build_loader(DataConfig(shards=digits, num_workers=0), DistInfo(), split=split,
                          train=False, batch_size=64, seed=0)
    loss_sum = correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            logits = model(images)
            loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(1) == labels).sum().item()
            total += labels.numel()
    return loss_sum, correct, total


def test_best_checkpoint_loads_into_plain_timm(demo_run, digits):
    _, correct, total = _plain_timm_eval(demo_run, digits, "best.pt", "val")
    best_acc = max(e["acc"] for e in _records(os.path.join(demo_run, "eval.jsonl"))
                   if e["split"] == "val")
    assert total == _split_size(digits, "val") and correct / total == pytest.approx(best_acc, abs=1e-9)


def test_final_test_eval_on_two_ranks_equals_last_checkpoint_in_one_process(demo_run, digits):
    """After the last update each DDP rank holds its own BatchNorm stats; the trainer's final
    2-rank eval must still be the eval of one model: the one saved in last.pt."""
    loss_sum, correct, total = _plain_timm_eval(demo_run, digits, "last.pt", "test")
    test = [e for e in _records(os.path.join(demo_run, "eval.jsonl")) if e["split"] == "test"][0]
    assert total == test["count"] == _split_size(digits, "test")
    assert test["acc"] == pytest.approx(correct / total, abs=1e-9)
    assert test["loss"] == pytest.approx(loss_sum / total, rel=1e-5)


def test_resume_from_step_checkpoint_continues_exactly(demo_run, digits, tmp_path):
    """Resume (2 ranks) from the step-60 file into a new run: the same losses as the original
    run from step 61 on, and the same final weights."""
    step_file = os.path.join(demo_run, "checkpoints", "step_00000060.pt")
    resumed = str(tmp_path / "resumed")
    run_torchrun("-m", "ddp_train", f"data.shards={digits}", f"run.path={resumed}",
                 "checkpoint.every_steps=20", "checkpoint.keep_last=20", "log.progress=plain",
                 "data.num_workers=1", "--resume", step_file, timeout=600)
    original, again = _steps(demo_run), _steps(resumed)
    assert min(again) == 61 and max(again) == max(original)
    for step in again:
        assert again[step]["loss"] == pytest.approx(original[step]["loss"], rel=1e-5), step
    records = _records(os.path.join(resumed, "metrics.jsonl"))
    assert {"event": "resume", "step": 60}.items() <= records[0].items()
    a = torch.load(os.path.join(demo_run, "checkpoints", "last.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(resumed, "checkpoints", "last.pt"), weights_only=True)["model"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_two_rank_eval_equals_single_process(demo_run, digits, tmp_path):
    script = os.path.join(ROOT, "tests", "dist_scripts", "eval_check.py")
    best = os.path.join(demo_run, "checkpoints", "best.pt")
    run_torchrun(script, best, digits, str(tmp_path / "two"))
    run_torchrun(script, best, digits, str(tmp_path / "one"), nproc=1)
    two, one = read_json(str(tmp_path / "two.json")), read_json(str(tmp_path / "one.json"))
    assert two["confusion_matrix"] == one["confusion_matrix"] and two["count"] == _split_size(digits, "val")
    assert two["acc"] == one["acc"] and two["macro_f1"] == one["macro_f1"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)


def test_refuses_to_reuse_a_run_folder(demo_run, digits):
    import subprocess

    from conftest import torchrun_env

    proc = subprocess.run([sys.executable, "-m", "ddp_train", f"data.shards={digits}",
                           f"run.path={demo_run}"], capture_output=True, text=True,
                          env=torchrun_env(), cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr


def _quick(digits: str, run_path, *extra: str):
    """A small single-process config on the digits (test_resnet, main-process loading)."""
    return load_config(None, [f"data.shards={digits}", f"run.path={run_path}",
                              "model.name=test_resnet", "data.num_workers=0",
                              "log.progress=none", "eval.test_at_end=false", *extra])


def test_resume_auto_in_place_appends_logs(digits, tmp_path):
    run = tmp_path / "run"
    first = train(_quick(digits, run, "train.epochs=1"), DistInfo())
    per_epoch = first["step"]
    second = train(_quick(digits, run, "train.epochs=2", "run.resume=auto"), DistInfo())
    assert second["run_dir"] == first["run_dir"] and second["step"] == 2 * per_epoch
    records = _records(os.path.join(run, "metrics.jsonl"))
    resume = [i for i, r in enumerate(records) if r.get("event") == "resume"]
    assert len(resume) == 1 and records[resume[0]]["step"] == per_epoch
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 2 * per_epoch + 1))  # nothing truncated, nothing repeated
    assert len([e for e in _records(os.path.join(run, "eval.jsonl"))]) == 2
    assert os.path.exists(os.path.join(run, "config-1.yaml"))  # the changed config kept


def test_resume_reports_the_config_keys_that_changed(digits, tmp_path):
    run = tmp_path / "run"
    train(_quick(digits, run, "train.max_steps=2", "eval.every_epoch=false"), DistInfo())
    train(_quick(digits, run, "train.max_steps=3", "eval.every_epoch=false", "optim.lr=0.001",
                 "run.resume=auto"), DistInfo())
    changed = [r for r in _records(os.path.join(run, "metrics.jsonl"))
               if r.get("event") == "config_changed"]
    assert len(changed) == 1 and changed[0]["step"] == 2
    assert changed[0]["changes"] == {"optim.lr": [0.003, 0.001], "train.max_steps": [2, 3]}
    log = open(os.path.join(run, "train.log")).read()
    assert "WARNING: config changed since" in log
    assert "optim.lr 0.003 -> 0.001; train.max_steps 2 -> 3" in log


def test_early_stop_on_target(digits, tmp_path):
    result = train(_quick(digits, tmp_path / "run", "train.epochs=3", "eval.every_steps=4",
                          "early_stop.target=0.3"), DistInfo())
    assert result["stop_reason"].startswith("early stop: acc reached the target")
    assert result["step"] < 3 * 44 and result["val"]["acc"] >= 0.3


def test_grad_accum_bf16_label_smoothing(digits, tmp_path):
    result = train(_quick(digits, tmp_path / "run", "train.grad_accum=2", "engine.precision=bf16",
                          "loss.label_smoothing=0.1", "train.max_steps=3",
                          "eval.every_epoch=false", "schedule.name=step"), DistInfo())
    steps = _steps(result["run_dir"])
    assert sorted(steps) == [1, 2, 3] and all(r["loss"] > 0 for r in steps.values())
    assert result["stop_reason"] == "finished 3 updates"
