"""``ddp-train cv``: 3 folds x 2 ranks (torchrun) on a tiny digits subset packed with --folds 3,
killed in fold 1 and re-run; then OOF coverage, summary and the fold ensemble's test metrics.

CPU: each torchrun launch costs ~10-20 s, so one cv folder serves every assertion.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, read_json, torchrun_env
from ddp_train import cv, infer
from ddp_train.cv_results import fold_source
from ddp_train.ensemble import shard_source
from ddp_train.shards.pack import pack

PER_CLASS = 12  # 120 digits: 100 train (3 folds of ~33) + 20 test
FAST = ["train.max_steps=12", "train.batch_size=8", "eval.every_steps=12", "data.num_workers=0",
        "log.progress=none", "checkpoint.every_steps=1"]


def pack_digits(root: str, folds: int) -> str:
    """The first PER_CLASS digits of each class, packed with ``folds`` folds and a test split."""
    from sklearn.datasets import load_digits

    digits, seen = load_digits(), {}
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        if seen.get(label, 0) < PER_CLASS:
            seen[label] = seen.get(label, 0) + 1
            os.makedirs(os.path.join(root, "img", str(label)), exist_ok=True)
            Image.fromarray(np.clip(image * 255 / 16, 0, 255).astype(np.uint8), mode="L").save(
                os.path.join(root, "img", str(label), f"{i:04d}.png"))
    out = os.path.join(root, "shards")
    pack(os.path.join(root, "img"), out, folds=folds, test_fraction=0.2, seed=0, shard_size=16,
         workers=1, progress="none")
    return out


def cv_cmd(shards: str, out: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ddp_train.cv", "--out", out, "--ranks", "2",
            f"data.shards={shards}", *FAST, *extra]


@pytest.fixture(scope="module")
def folded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cv"))
    return {"root": root, "shards": pack_digits(root, 3), "out": os.path.join(root, "cv")}


@pytest.fixture(scope="module")
def done(folded):
    """cv killed (SIGKILL) once fold 1 has a checkpoint, then run again to the end."""
    out, env = folded["out"], torchrun_env()
    proc = subprocess.Popen(cv_cmd(folded["shards"], out), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # a group: SIGKILL takes torchrun too
    ckpt, deadline = os.path.join(out, "fold1", "checkpoints", "last.pt"), time.time() + 240
    while not os.path.exists(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(ckpt), proc.stdout.read().decode()[-3000:]
    fold0 = os.path.join(out, "fold0", "metrics.jsonl")
    before = (open(fold0, "rb").read(), os.stat(fold0).st_mtime_ns)
    again = subprocess.run(cv_cmd(folded["shards"], out), env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    return {**folded, "fold0_before": before, "stdout": again.stdout}


def events(run_dir: str) -> list[str]:
    return [json.loads(line).get("event") for line in open(os.path.join(run_dir, "metrics.jsonl"))
            if '"event"' in line]


def test_kill_resumes_the_fold_and_skips_finished_ones(done):
    out = done["out"]
    assert "fold 0: finished already" in done["stdout"]
    path = os.path.join(out, "fold0", "metrics.jsonl")
    assert (open(path, "rb").read(), os.stat(path).st_mtime_ns) == done["fold0_before"]
    assert "resume" in events(os.path.join(out, "fold1")) and "fold 1: resumes" in done["stdout"]
    assert all(events(os.path.join(out, f"fold{k}"))[-1] == "end" for k in range(3))
    assert os.path.exists(os.path.join(out, "fold1", cv.FOLD_CONFIG))


def test_oof_covers_every_train_sample_once_by_its_own_fold_model(done):
    rows = [json.loads(line) for line in open(os.path.join(done["out"], "oof.jsonl"))]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys))
    loaded = [infer.load_checkpoint(os.path.join(done["out"], f"fold{k}"), "cpu")
              for k in range(3)]
    fold_keys = [{ids["key"] for ids, _ in fold_source(done["shards"], k)(loaded[k])}
                 for k in range(3)]
    assert set(keys) == set().union(*fold_keys) and sum(map(len, fold_keys)) == len(keys) == 100
    for r in rows:  # scored by the fold that held it out, with that model's probabilities
        assert r["key"] in fold_keys[r["fold"]]
        assert abs(sum(r["probs"].values()) - 1) < 1e-5 and r["pred"] == max(
            r["probs"], key=r["probs"].get)
    k, row = rows[0]["fold"], rows[0]
    model = infer.inference_model(loaded[k], None, loaded[k].temperature)
    for ids, logits in infer.batch_logits(loaded[k], model, fold_source(done["shards"], k)(
            loaded[k]), 64):
        p = torch.softmax(logits.double(), 1)[[i["key"] for i in ids].index(row["key"])]
        assert p.tolist() == pytest.approx([row["probs"][c] for c in loaded[k].classes], abs=1e-6)


def test_summary_per_fold_mean_std_and_ensemble_equals_hand_average(done):
    s = read_json(os.path.join(done["out"], "summary.json"))
    assert [f["fold"] for f in s["per_fold"]] == [0, 1, 2] and s["complete"]
    accs = [f["val"]["last"]["acc"] for f in s["per_fold"]]
    assert s["mean_std"]["val_last"]["acc"]["mean"] == pytest.approx(np.mean(accs))
    assert s["mean_std"]["val_last"]["acc"]["std"] == pytest.approx(np.std(accs, ddof=1))
    for f in s["per_fold"]:  # last scores the fold exactly as the run's final val eval did
        assert f["checkpoint_kind"] == "last" and f["oof"]["count"] == f["val"]["last"]["count"]
        assert f["oof"]["acc"] == pytest.approx(f["val"]["last"]["acc"])
    assert s["oof"]["count"] == 100 and len(s["oof"]["confusion_matrix"]) == 10
    # the fold ensemble on test = the mean of each fold's single-model probabilities
    probs = []
    for k in range(3):
        loaded = infer.load_checkpoint(os.path.join(done["out"], f"fold{k}"), "cpu")
        model, rows = infer.inference_model(loaded, None, loaded.temperature), {}
        for ids, logits in infer.batch_logits(loaded, model,
                                              shard_source(done["shards"], "test")(loaded), 7):
            rows.update({i["key"]: (p, i["target"]) for i, p in
                         zip(ids, torch.softmax(logits.double(), 1))})
        probs.append(rows)
    keys = sorted(probs[0])
    mean = torch.stack([sum(p[key][0] for p in probs) / 3 for key in keys])
    targets = [loaded.classes.index(probs[0][key][1]) for key in keys]
    assert s["test"]["count"] == 20
    assert s["test"]["acc"] == pytest.approx(float((mean.argmax(1) == torch.tensor(targets))
                                                   .double().mean()))
    nll = -float(mean[torch.arange(20), targets].log().mean())
    assert s["test"]["nll"] == pytest.approx(nll, rel=1e-6)
    report = open(os.path.join(done["out"], "report.md")).read()
    assert "mean ± std" in report and "![oof_confusion](oof_confusion.png)" in report
    assert os.path.getsize(os.path.join(done["out"], "cv_folds.png")) > 1000


def test_collect_alone_rewrites_the_results(done):
    os.remove(os.path.join(done["out"], "oof.jsonl"))
    assert cv.main(["--out", done["out"], "--collect"]) == 0
    assert sum(1 for _ in open(os.path.join(done["out"], "oof.jsonl"))) == 100


def test_bad_inputs_are_one_line_exit_2_and_train_nothing(folded, tmp_path, capsys):
    flat = os.path.join(str(tmp_path), "flat")
    pack(os.path.join(folded["root"], "img"), flat, test_fraction=0.2, workers=1,
         progress="none", shard_size=64)
    out = str(tmp_path / "never")
    cases = [(["--folds", "0,3"], "3 folds"), ([f"data.shards={flat}"], "--folds K"),
             (["data.fold=1"], "data.fold"), (["optim.lrr=1"], "optim.lrr")]
    for extra, needle in cases:
        argv = ["--out", out, f"data.shards={folded['shards']}", *extra]
        assert cv.main(argv) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err and err.startswith("ddp-train cv: error:")
    assert not os.path.exists(out)


def test_slurm_dry_run_renders_one_array_task_per_fold(folded, capsys):
    out = os.path.join(folded["root"], "slurm-cv")
    assert cv.main(["--out", out, "--slurm", "--dry-run", "--gpus", "2", "--array-parallel", "2",
                    f"data.shards={folded['shards']}"]) == 0
    text = capsys.readouterr().out
    assert "#SBATCH --array=0-2%2" in text and "#SBATCH --gpus-per-node=2" in text
    for k in range(3):
        assert f"data.fold={k} run.path={out}/fold{k} run.resume=auto" in text


def test_cv5_recipe_runs_at_tiny_scale(folded, tmp_path):
    shards = pack_digits(str(tmp_path), 5)
    out = str(tmp_path / "cv5")
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_train.cv", "--config", "convnext_base_384_doc_cv5", "--out",
         out, "--folds", "0", f"data.shards={shards}", "model.name=convnext_atto",
         "model.num_classes=0", "data.image_size=32", "train.max_steps=2", "train.batch_size=8",
         "eval.every_steps=2", "eval.batch_size=16", "data.num_workers=0", "log.progress=none",
         "engine.precision=fp32"], env=torchrun_env(), cwd=ROOT, capture_output=True, text=True,
        timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = read_json(os.path.join(out, "summary.json"))
    assert s["num_folds"] == 5 and s["folds"] == [0] and not s["complete"]
    assert s["per_fold"][0]["temperature"] != 1.0  # calibration.enabled in the recipe
