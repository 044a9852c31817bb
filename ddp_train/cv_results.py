"""What ``ddp-train cv`` writes once the folds are trained: out-of-fold predictions, the fold
ensemble's test metrics and the per-fold spread (``oof.jsonl``, ``summary.json``, ``report.md``).

Out-of-fold (OOF): every train sample is scored by the one fold model that never trained on it,
the model of fold k scoring fold k's samples (its run's val split under ``data.fold=k``). The
OOF metrics are therefore one estimate over the whole train split, computed sample by sample,
next to the mean ± std of the K per-fold val scores.

Which checkpoint scores a fold (``oof_checkpoint``): ``last`` by default. ``best.pt`` was
selected on the fold's val split, which *is* its OOF fold, so its OOF scores carry a (mild)
selection bias; ``last`` was never chosen by looking at that fold. The same choice scores the
test split, where either is fair. A fold without the asked-for file falls back to ``last`` and
``summary.json`` says so per fold.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Optional, Sequence

import torch

from . import calibrate, infer
from . import logformat as fmt
from .ensemble import Ensemble, shard_source
from .infer import InferenceError, Loaded
from .metrics import ConfusionMatrix
from .shards.manifest import load_manifest

OOF = "oof.jsonl"
SUMMARY = "summary.json"
FOLD_METRICS = ("acc", "macro_f1", "loss")  # per-fold numbers averaged over the folds


def fold_dir(out: str, k: int) -> str:
    """The run folder of fold ``k``."""
    return os.path.join(out, f"fold{k}")


def fold_source(shards: str, fold: int):
    """Every sample of fold ``fold`` (the val split of the run ``data.fold=fold``), with its key
    and target, read like :func:`ddp_train.ensemble.shard_source` reads a packed split."""
    return lambda loaded: infer._shard_samples(loaded, shards, "val", fold=fold)


def fold_checkpoint(run_dir: str, which: str) -> tuple[str, str]:
    """``(path, used)``: the fold's ``which`` checkpoint (``best``/``last``, .pt or DeepSpeed
    folder), or its last one when ``best`` is absent (no val eval ran, or save_best off)."""
    folder = os.path.join(run_dir, "checkpoints")
    for name in ([which] if which == "last" else [which, "last"]):
        for path in (os.path.join(folder, name + ".pt"), os.path.join(folder, name)):
            if os.path.exists(path):
                return path, name
    raise InferenceError(f"{run_dir}: no {which} checkpoint (has the fold finished?)")


def metrics_of(probs: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
               bins: int = 15) -> dict:
    """Eval's metrics of ``(n, C)`` probabilities: acc, macro-F1, per class, confusion matrix,
    count, NLL and ECE (the dict of ``ddp-train eval``)."""
    matrix = ConfusionMatrix(len(classes))
    matrix.update(probs, targets)
    result = matrix.summary(classes)
    log_p = probs.double().clamp_min(torch.finfo(torch.float64).tiny).log()  # softmax(log p) = p
    result.update(nll=calibrate.nll(log_p, targets), ece=calibrate.ece(log_p, targets, bins=bins))
    return result


def val_records(run_dir: str, metric: str) -> dict:
    """The fold's ``last`` and ``best`` (by ``metric``) val records of its eval.jsonl, each
    ``{step, count, acc, macro_f1, loss}`` or None when the run never evaluated val."""
    records = []
    try:
        with open(os.path.join(run_dir, fmt.EVALS), "rb") as f:
            for line in f:
                try:
                    record = fmt.loads(line)
                except ValueError:  # a torn last line of a killed run
                    continue
                if record.get("split") == "val":
                    records.append(record)
    except OSError:
        pass
    keep = ("step", "count", *FOLD_METRICS)
    pick = (lambda r: {k: r.get(k) for k in keep}) if records else (lambda r: None)
    sign = -1 if metric == "loss" else 1
    best = max(records, key=lambda r: sign * float(r.get(metric, math.nan))) if records else None
    return {"last": pick(records[-1]) if records else None, "best": pick(best)}


def mean_std(values: Sequence[Optional[float]]) -> Optional[dict]:
    """``{mean, std, n}`` over the folds (std: sample standard deviation, 0 for one fold);
    None when any fold lacks the value (a mean over some folds would hide which)."""
    if not values or any(v is None or not math.isfinite(v) for v in values):
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)  # a reader sees the old file or the new one, never half of one


def collect(out: str, shards: str, folds: Sequence[int], num_folds: int, *,
            oof_checkpoint: str = "last", early_stop_metric: str = "acc", device: str = "auto",
            batch_size: int = 64, header: Optional[dict] = None) -> dict:
    """Score OOF and test, write ``oof.jsonl``, ``summary.json`` and ``report.md`` (with figures)
    into ``out``; returns the summary. ``folds``: the fold indices to collect (all K for a full
    OOF set); ``header``: extra keys for the summary (config, overrides)."""
    loaded, per_fold, oof_rows = [], [], []
    all_probs, all_targets = [], []
    for k in folds:
        run_dir = fold_dir(out, k)
        path, used = fold_checkpoint(run_dir, oof_checkpoint)
        member = infer.load_checkpoint(path, device)
        loaded.append(member)
        # One member, its own temperature: the single-model probabilities of the fold model.
        scores = Ensemble([member], names=[path]).probabilities(fold_source(shards, k), batch_size)
        classes = member.classes
        index = {c: i for i, c in enumerate(classes)}
        targets = torch.tensor([index[s["target"]] for s in scores.ids])
        bins = member.cfg.calibration.bins
        for ids, p in zip(scores.ids, scores.probs.tolist()):
            oof_rows.append({"key": ids["key"], "fold": k, "label": ids["target"],
                             "pred": classes[max(range(len(p)), key=p.__getitem__)],
                             "probs": {c: round(v, 8) for c, v in zip(classes, p)}})
        all_probs.append(scores.probs)
        all_targets.append(targets)
        oof = metrics_of(scores.probs, targets, classes, bins)
        per_fold.append({"fold": k, "run_dir": run_dir, "checkpoint": path,
                         "checkpoint_kind": used, "temperature": member.temperature,
                         "val": val_records(run_dir, early_stop_metric),
                         "oof": {m: oof[m] for m in ("acc", "macro_f1", "nll", "count")}})
    classes = loaded[0].classes
    bins = loaded[0].cfg.calibration.bins
    oof_all = metrics_of(torch.cat(all_probs), torch.cat(all_targets), classes, bins)
    keys = [r["key"] for r in oof_rows]
    if len(set(keys)) != len(keys):  # the folds partition train: a repeat is a packing bug
        raise InferenceError("out-of-fold scoring saw a sample key twice; keys must be unique")
    _write_atomic(os.path.join(out, OOF), "".join(json.dumps(r) + "\n" for r in oof_rows))

    summary = {**(header or {}), "shards": shards, "num_folds": num_folds, "folds": list(folds),
               "classes": classes, "oof_checkpoint": oof_checkpoint,
               "complete": sorted(folds) == list(range(num_folds)),
               "generated": time.strftime("%Y-%m-%d %H:%M:%S"), "per_fold": per_fold,
               "mean_std": _spread(per_fold), "oof": oof_all,
               "test": _test_metrics(loaded, per_fold, shards, batch_size)}
    _write_atomic(os.path.join(out, SUMMARY), json.dumps(summary, indent=1) + "\n")
    from .plot.cv import write_cv_report

    summary["report"] = write_cv_report(out, summary)
    return summary


def _spread(per_fold: list[dict]) -> dict:
    """Mean ± std over the folds of each per-fold number: val (last and best records) and OOF."""
    spread: dict = {}
    for source in ("last", "best"):
        spread[f"val_{source}"] = {m: mean_std([(f["val"][source] or {}).get(m)
                                                for f in per_fold]) for m in FOLD_METRICS}
    spread["oof"] = {m: mean_std([f["oof"][m] for f in per_fold])
                     for m in ("acc", "macro_f1", "nll")}
    return spread


def _test_metrics(loaded: list[Loaded], per_fold: list[dict], shards: str,
                  batch_size: int) -> Optional[dict]:
    """The fold ensemble (equal weights, each fold's temperature) on the test split, with each
    member's own metrics; None when the dataset has no test samples."""
    manifest = load_manifest(shards)
    if "test" not in manifest.splits or not manifest.split("test").num_samples:
        return None
    ens = Ensemble(loaded, names=[f["checkpoint"] for f in per_fold])
    scores = ens.probabilities(shard_source(shards, "test"), batch_size)
    index = {c: i for i, c in enumerate(ens.classes)}
    targets = torch.tensor([index[s["target"]] for s in scores.ids])
    bins = loaded[0].cfg.calibration.bins
    result = metrics_of(scores.probs, targets, ens.classes, bins)
    result["members"] = []
    for f, member, probs in zip(per_fold, ens.members, scores.member_probs):
        m = metrics_of(probs, targets, ens.classes, bins)
        result["members"].append({"fold": f["fold"], "weight": member.weight,
                                  "temperature": member.temperature,
                                  **{k: m[k] for k in ("acc", "macro_f1", "nll", "ece")}})
    return result
