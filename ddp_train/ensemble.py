"""Ensembles of trained checkpoints: the weighted mean of the members' class probabilities.

    ddp-train eval --ensemble A B C --shards DIR [--split test] [--weights 0.5,0.3,0.2] [--tta]
                   [--members] [--out metrics.json]
    ddp-train predict --ensemble A B C [--] IMAGE_OR_FOLDER... [--weights ...] [--members]
    ddp-train predict --ensemble A B C --shards DIR [--split test] [--out preds.csv]

A member is anything ``ddp-train eval`` takes (:func:`ddp_train.infer.load_checkpoint`) and keeps
all of its own: model (members may differ in architecture), deterministic eval transform (and so
image size), TTA views and temperature. The ensemble's class probabilities are

    p(x) = sum_m w_m * softmax(z_m(x) / T_m),    w_m >= 0,  sum_m w_m = 1

Probabilities, not logits, are averaged: different models' logits live on different scales (a
temperature only rescales one model's), while every member's probabilities are distributions on
the same scale, so their weighted mean is one too and a weight means what it says.

:class:`Ensemble` is the reusable part (cross-validation, export); :func:`evaluate_ensemble`,
:func:`predict_ensemble` and :func:`run_command` serve the CLI.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from . import calibrate, infer
from .infer import InferenceError, Loaded

Source = Callable[[Loaded], Iterable[tuple[dict, Any]]]
"""Samples for one member: ``source(loaded)`` yields ``(ids, inputs)`` pairs, the inputs made by
``loaded``'s own eval transform. ``ids`` holds the sample's unique ``key`` (shards) or ``path``
(image files) and, when known, its true class name as ``target``."""


def image_source(paths: Sequence[str]) -> Source:
    """Image files, and the image files under folders (as ``ddp-train predict`` finds them)."""
    files = list(dict.fromkeys(infer.image_files(list(paths))))  # a file named twice: one sample
    return lambda loaded: infer._image_samples(loaded, files)


def shard_source(shards: str, split: str) -> Source:
    """Every readable sample of ``split`` of a packed dataset, with its key and target."""
    return lambda loaded: infer._shard_samples(loaded, shards, split)


def sample_key(ids: dict) -> str:
    """The key that identifies a sample across members: its shard key, else its file path."""
    return ids["key"] if "key" in ids else ids["path"]


def parse_weights(text: str, count: int) -> Optional[list[float]]:
    """``"0.5,0.3,0.2"`` as floats for ``count`` members (None for ""); InferenceError if bad."""
    if not text.strip():
        return None
    try:
        weights = [float(w) for w in text.split(",")]
    except ValueError:
        raise InferenceError(f"--weights {text}: give comma-separated numbers, e.g. "
                             f"0.5,0.3,0.2") from None
    normalise_weights(weights, count)  # validate now, before any model is loaded
    return weights


def normalise_weights(weights: Optional[Sequence[float]], count: int) -> list[float]:
    """``weights`` scaled to sum 1 (equal when None); InferenceError for a wrong count, a
    negative or non-finite weight, or all zeros."""
    if weights is None:
        return [1.0 / count] * count
    weights = [float(w) for w in weights]
    if len(weights) != count:
        raise InferenceError(f"--weights: {len(weights)} weights for {count} ensemble members")
    bad = [w for w in weights if not math.isfinite(w) or w < 0]
    if bad:
        raise InferenceError(f"--weights: {bad[0]:g} is not a weight (weights are >= 0)")
    total = sum(weights)
    if total <= 0:
        raise InferenceError("--weights: all weights are 0")
    return [w / total for w in weights]


def check_classes(members: Sequence[Loaded], names: Sequence[str]) -> None:
    """InferenceError naming the first member whose class list (names or order) differs from
    the first member's, and the first difference."""
    first = members[0].classes
    for loaded, name in zip(members[1:], names[1:]):
        if loaded.classes == first:
            continue
        pairs = list(zip(first, loaded.classes))
        i = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
        what = (f"class {i} is {first[i]!r} in the first and {loaded.classes[i]!r} in the "
                f"second" if i < len(pairs) else
                f"{len(first)} classes against {len(loaded.classes)}")
        raise InferenceError(f"ensemble members {names[0]} and {name} have different class "
                             f"lists: {what}")


@dataclass
class Member:
    """One checkpoint of an ensemble: its model (TTA-wrapped when asked, at T = 1), weight
    (normalised) and temperature. ``temperature`` may be reassigned, e.g. after a new fit."""

    name: str
    loaded: Loaded
    weight: float
    temperature: float
    model: nn.Module

    @property
    def tta_views(self) -> int:
        """Forward passes per sample (1 without TTA)."""
        return getattr(self.model.model, "num_views", 1)  # model: T(TTA(net)) or T(net)


@dataclass
class Scores:
    """Every sample of a source scored by every member, matched by sample key."""

    ids: list[dict]  # per sample: {"path"} or {"key", "target"}, in the first member's order
    logits: torch.Tensor  # (members, samples, classes) float32: TTA-averaged, at T = 1
    member_probs: torch.Tensor  # (members, samples, classes) float64: softmax(logits / T_m)
    probs: torch.Tensor  # (samples, classes) float64: sum_m w_m * member_probs[m]


class Ensemble:
    """Checkpoints whose probabilities are averaged with weights.

    ``members``: loaded checkpoints with identical class lists; ``weights``: one >= 0 number per
    member, normalised to sum 1 (default equal); ``tta``: every member averages its own
    config's TTA views; ``temperatures``: override the stored ones (e.g. ``[1.0] * n``).

        ens = Ensemble.load(["runs/a", "runs/b"], weights=[2, 1])
        scores = ens.probabilities(image_source(["photos/"]))
        labels = [ens.classes[i] for i in scores.probs.argmax(1)]
    """

    def __init__(self, members: Sequence[Loaded], weights: Optional[Sequence[float]] = None, *,
                 names: Optional[Sequence[str]] = None, tta: bool = False,
                 temperatures: Optional[Sequence[float]] = None) -> None:
        if not members:
            raise InferenceError("an ensemble needs at least one member")
        names = list(names) if names is not None else [m.path for m in members]
        check_classes(members, names)
        weights = normalise_weights(weights, len(members))
        temps = temperatures if temperatures is not None else [m.temperature for m in members]
        self.classes: list[str] = list(members[0].classes)
        self.members = [Member(name, loaded, w, float(t),
                               infer.inference_model(loaded, loaded.cfg.tta if tta else None, 1.0))
                        for name, loaded, w, t in zip(names, members, weights, temps)]

    @classmethod
    def load(cls, checkpoints: Sequence[str], weights: Optional[Sequence[float]] = None, *,
             tta: bool = False, use_temperature: bool = True,
             device: str = "auto") -> "Ensemble":
        """Load every checkpoint (:func:`~ddp_train.infer.load_checkpoint`) onto ``device``."""
        normalise_weights(weights, len(checkpoints))  # a bad weight costs no loading time
        loaded = [infer.load_checkpoint(c, device) for c in checkpoints]
        temps = None if use_temperature else [1.0] * len(loaded)
        return cls(loaded, weights, names=checkpoints, tta=tta, temperatures=temps)

    @property
    def weights(self) -> list[float]:
        """The normalised member weights."""
        return [m.weight for m in self.members]

    @property
    def temperatures(self) -> list[float]:
        """Each member's temperature."""
        return [m.temperature for m in self.members]

    def logits(self, source: Source, batch_size: int = 64) -> tuple[list[dict], torch.Tensor]:
        """Every member's TTA-averaged logits at T = 1 for every sample of ``source``:
        ``(ids, (members, samples, classes) tensor)``, rows matched by sample key.

        Each member reads ``source`` itself, with its own transform. The rows are matched by
        key, not by position: a sample stream drops what it cannot read (eval skips unreadable
        samples rather than repeating them) and a member's transform could fail where another's
        does not, so the i-th outputs of two members need not be the same sample, and a
        positional zip would silently average one image's probabilities with another's. Keys
        make the pairing explicit and let us check that every member scored every sample
        exactly once; anything else is an error, never a silently smaller ensemble.
        """
        ids, runs = None, []
        for member in self.members:
            member_ids, chunks = [], []
            for batch_ids, logits in infer.batch_logits(member.loaded, member.model,
                                                        source(member.loaded), batch_size):
                member_ids += batch_ids
                chunks.append(logits)
            if not member_ids:
                raise InferenceError(f"{member.name}: the input holds no samples")
            row = _rows_by_key(member.name, member_ids)
            if ids is None:  # the first member's order is the output order
                ids, order = member_ids, list(row)
            elif row.keys() != set(order):
                missing = sorted(set(order) - row.keys()) or sorted(row.keys() - set(order))
                raise InferenceError(f"ensemble members {self.members[0].name} and {member.name} "
                                     f"scored different samples (e.g. {missing[0]!r})")
            runs.append(torch.cat(chunks)[[row[k] for k in order]])
        return ids, torch.stack(runs)

    def combine(self, logits: torch.Tensor, temperatures: Optional[Sequence[float]] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(member_probs, probs)`` from :meth:`logits` output: each member's softmax at its
        temperature (``temperatures`` overrides them) and their weighted sum, in float64."""
        temps = self.temperatures if temperatures is None else list(temperatures)
        t = torch.tensor(temps, dtype=torch.float64).view(-1, 1, 1)
        member_probs = torch.softmax(logits.double() / t, dim=2)
        w = torch.tensor(self.weights, dtype=torch.float64).view(-1, 1, 1)
        return member_probs, (w * member_probs).sum(dim=0)

    def probabilities(self, source: Source, batch_size: int = 64) -> Scores:
        """The ensemble's (and each member's) probabilities for every sample of ``source``."""
        ids, logits = self.logits(source, batch_size)
        return Scores(ids, logits, *self.combine(logits))


def _rows_by_key(name: str, ids: list[dict]) -> dict[str, int]:
    rows: dict[str, int] = {}
    for i, sample in enumerate(ids):
        key = sample_key(sample)
        if key in rows:
            raise InferenceError(f"{name}: sample {key!r} was scored twice; ensemble members are "
                                 f"matched by sample key, so keys must be unique")
        rows[key] = i
    return rows


# ------------------------------------------------------------------------------------- eval


def _targets(ens: Ensemble, ids: list[dict]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(ens.classes)}
    return torch.tensor([index[s["target"]] for s in ids], dtype=torch.long)


def _metrics(probs: torch.Tensor, targets: torch.Tensor, classes: list[str], bins: int) -> dict:
    """Single-model eval's metrics of ``(n, C)`` probabilities: accuracy, macro-F1, per class,
    confusion matrix, count, NLL and ECE."""
    from .metrics import ConfusionMatrix

    matrix = ConfusionMatrix(len(classes))
    matrix.update(probs, targets)
    result = matrix.summary(classes)
    # calibrate's functions take logits; log p is one, since softmax(log p) = p
    log_p = probs.clamp_min(torch.finfo(torch.float64).tiny).log()
    result.update(nll=calibrate.nll(log_p, targets), ece=calibrate.ece(log_p, targets, bins=bins))
    return result


def evaluate_ensemble(checkpoints: Sequence[str], shards: str, *, split: str = "test",
                      weights: Optional[Sequence[float]] = None, tta: bool = False,
                      fit_split: str = "", use_temperature: bool = True, members: bool = False,
                      device: str = "auto", batch_size: int = 64) -> dict:
    """The single-model eval metrics (:func:`ddp_train.infer.evaluate_checkpoint`) of the
    ensemble on ``split``; ``*_uncalibrated`` averages the members' T = 1 probabilities.

    ``fit_split`` fits each member's temperature on that split first. ``members`` adds each
    member's own metrics on the same samples to its entry of ``"members"``.
    """
    ens = Ensemble.load(checkpoints, weights, tta=tta, use_temperature=use_temperature,
                        device=device)
    if fit_split:
        fit_ids, fit_logits = ens.logits(shard_source(shards, fit_split), batch_size)
        for member, logits in zip(ens.members, fit_logits):
            member.temperature = calibrate.fit_temperature(
                logits, _targets(ens, fit_ids), member.loaded.cfg.calibration.max_iter)
    scores = ens.probabilities(shard_source(shards, split), batch_size)
    targets, bins = _targets(ens, scores.ids), ens.members[0].loaded.cfg.calibration.bins
    result = _metrics(scores.probs, targets, ens.classes, bins)
    _, probs_t1 = ens.combine(scores.logits, [1.0] * len(ens.members))
    t1 = _metrics(probs_t1, targets, ens.classes, bins)
    result.update(shards=shards, split=split, nll_uncalibrated=t1["nll"],
                  ece_uncalibrated=t1["ece"], members=[])
    for member, probs in zip(ens.members, scores.member_probs):
        entry = dict(checkpoint=member.name, weight=member.weight,
                     temperature=member.temperature, tta_views=member.tta_views)
        if members:
            entry.update(_metrics(probs, targets, ens.classes, bins))
        result["members"].append(entry)
    return result


def format_ensemble_metrics(m: dict) -> str:
    """The ensemble eval result for a terminal, laid out like the single-model one, with a
    member table (metrics too when computed)."""
    lines = [f"ensemble of {len(m['members'])} on {m['shards']} {m['split']}: "
             f"{m['count']} samples",
             f"acc {m['acc']:.4f} | macro_f1 {m['macro_f1']:.4f} | nll {m['nll']:.4f} "
             f"(T=1: {m['nll_uncalibrated']:.4f}) | ece {m['ece']:.4f} "
             f"(T=1: {m['ece_uncalibrated']:.4f})"]
    scored = "acc" in m["members"][0]
    head = f"{'member':<8} {'weight':>7} {'T':>8} {'views':>5}"
    lines.append(head + (f" {'acc':>7} {'macro_f1':>8} {'nll':>7} {'ece':>7}" if scored else "")
                 + "  checkpoint")
    for i, e in enumerate(m["members"], 1):
        line = (f"{'m' + str(i):<8} {e['weight']:>7.4f} {e['temperature']:>8.4f} "
                f"{e['tta_views']:>5}")
        if scored:
            line += f" {e['acc']:>7.4f} {e['macro_f1']:>8.4f} {e['nll']:>7.4f} {e['ece']:>7.4f}"
        lines.append(f"{line}  {e['checkpoint']}")
    lines.append(infer.format_class_table(m["per_class"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- predict


def predict_ensemble(checkpoints: Sequence[str], images: Sequence[str], *, shards: str = "",
                     split: str = "test", weights: Optional[Sequence[float]] = None,
                     out: str = "-", tta: bool = False, members: bool = False,
                     device: str = "auto", batch_size: int = 64) -> int:
    """``ddp-train predict``'s CSV for the ensemble; ``members`` adds ``m<i>_label`` and
    ``m<i>_prob`` columns (member i's top class and its probability). Returns the row count."""
    ens = Ensemble.load(checkpoints, weights, tta=tta, device=device)
    multimodal = [m.name for m in ens.members if m.loaded.inputs]
    if multimodal and not shards:
        raise InferenceError(f"{multimodal[0]} also takes {', '.join(ens.members[0].loaded.inputs)}"
                             f" inputs: predict from --shards holding them")
    source = shard_source(shards, split) if shards else image_source(images)
    scores = ens.probabilities(source, batch_size)  # all scored before the output is opened
    first = ["key", "target"] if shards else ["path"]
    header = first + ["label"] + [f"prob_{c}" for c in ens.classes]
    if members:
        header += [f"m{i}_{col}" for i in range(1, len(ens.members) + 1)
                   for col in ("label", "prob")]
    f = sys.stdout if out == "-" else open(out, "w", newline="", encoding="utf-8")
    try:
        writer = csv.writer(f)
        writer.writerow(header)
        for n, (ids, p) in enumerate(zip(scores.ids, scores.probs)):
            row = [ids[k] for k in first] + [ens.classes[int(p.argmax())]]
            row += [f"{v:.6f}" for v in p.tolist()]
            if members:
                for conf, top in zip(*scores.member_probs[:, n].max(dim=1)):
                    row += [ens.classes[int(top)], f"{float(conf):.6f}"]
            writer.writerow(row)
    finally:
        if f is not sys.stdout:
            f.close()
    return len(scores.ids)


# -------------------------------------------------------------------------------------- CLI


def is_checkpoint(path: str) -> bool:
    """A run folder (with ``checkpoints/``) or a checkpoint with its JSON sidecar."""
    return (os.path.isdir(os.path.join(path, "checkpoints"))
            or os.path.isfile(path.rstrip("/" + os.sep) + ".json"))


def split_members(tokens: Sequence[str]) -> tuple[list[str], list[str]]:
    """``predict --ensemble A B C photos/ x.png`` reads all of it into ``--ensemble``: the
    members are the leading checkpoints, the images start at the first path that is none
    (``--`` before the images, or the images before ``--ensemble``, avoids the question)."""
    for i, token in enumerate(tokens):
        if not os.path.exists(token):
            raise InferenceError(f"{token}: no such checkpoint, image file or folder")
        if not is_checkpoint(token):
            return list(tokens[:i]), list(tokens[i:])
    return list(tokens), []


def run_command(command: str, args: argparse.Namespace) -> int:
    """``ddp-train eval|predict --ensemble ...`` with :func:`ddp_train.infer_cli.main`'s
    arguments."""
    if command == "eval":
        if args.checkpoint:
            raise InferenceError(f"{args.checkpoint}: give CHECKPOINT or --ensemble, not both")
        weights = parse_weights(args.weights, len(args.ensemble))
        metrics = evaluate_ensemble(args.ensemble, args.shards, split=args.split,
                                    weights=weights, tta=args.tta,
                                    fit_split=args.fit_temperature,
                                    use_temperature=not args.no_temperature,
                                    members=args.members, device=args.device,
                                    batch_size=args.batch_size)
        print(format_ensemble_metrics(metrics))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(metrics, f, indent=1)
        return 0
    checkpoints, images = split_members(args.ensemble)
    images = [p for p in (args.checkpoint, *args.images) if p] + images
    if not checkpoints:
        raise InferenceError(f"--ensemble {args.ensemble[0]}: not a run folder or a checkpoint "
                             f"with its .json sidecar")
    if bool(images) == bool(args.shards):
        raise InferenceError("give image files/folders or --shards DIR (one of them)")
    rows = predict_ensemble(checkpoints, images, shards=args.shards, split=args.split,
                            weights=parse_weights(args.weights, len(checkpoints)), out=args.out,
                            tta=args.tta, members=args.members, device=args.device,
                            batch_size=args.batch_size)
    if args.members:
        for i, name in enumerate(checkpoints, 1):
            print(f"m{i}: {name}", file=sys.stderr)
    if args.out != "-":
        print(f"wrote {rows} predictions to {args.out}", file=sys.stderr)
    return 0
