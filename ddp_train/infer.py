"""``ddp-train eval`` and ``ddp-train predict``: a trained checkpoint on one GPU or the CPU.

No torchrun and no run folder needed: a checkpoint describes itself. Its JSON sidecar holds the
class names, the temperature and the resolved config (for checkpoints written before the config
was stored there, the run folder's ``config.yaml`` next to ``checkpoints/``), from which the
model (timm or the multimodal FiLM model) and its deterministic eval transform are rebuilt.
Accepted: a run folder (its ``checkpoints/last``), a ``.pt`` checkpoint, a DeepSpeed checkpoint
folder (consolidated on the fly), and ``ddp-train export-weights`` output.

    ddp-train eval CHECKPOINT --shards DIR [--split test] [--tta] [--out metrics.json]
    ddp-train predict CHECKPOINT IMAGE_OR_FOLDER... [--tta] [--out preds.csv]
    ddp-train predict CHECKPOINT --shards DIR [--split test] [--out preds.csv]

``--ensemble A B C ...`` in place of CHECKPOINT evaluates or predicts with the weighted mean of
several checkpoints' probabilities (:mod:`ddp_train.ensemble`). The command lines themselves are
:mod:`ddp_train.infer_cli`.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import yaml
from torch import nn

from . import calibrate
from . import checkpoint as ckpt
from .config import Config, ConfigError, TTAConfig, from_dict


class InferenceError(ValueError):
    """A bad path or a checkpoint/dataset mismatch; the CLI prints it as one line, exit 2."""


@dataclass
class Loaded:
    """A checkpoint ready for inference: the model in eval mode on its device, and its context."""

    path: str
    model: nn.Module
    cfg: Config
    classes: list[str]
    temperature: float
    inputs: dict  # manifest specs of the extra members the model takes (multimodal)
    device: torch.device


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InferenceError(f"--device {name}: no CUDA device is visible")
    return torch.device(name)


def _config(path: str, meta: dict) -> Config:
    """The checkpoint's resolved config: sidecar, else the run folder's config.yaml, else the
    defaults with the sidecar's model name and image size."""
    tree = meta.get("config")
    run_yaml = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if tree is None and os.path.isfile(run_yaml):
        with open(run_yaml, encoding="utf-8") as f:
            tree = yaml.safe_load(f)
    if tree is None:
        if "model_name" not in meta:
            raise InferenceError(f"{path}: its sidecar names no model and no run config.yaml "
                                 f"is next to it")
        tree = {"model": {"name": meta["model_name"]},
                "data": {"image_size": meta.get("image_size", 32)}}
    tree = copy.deepcopy(tree)
    # Training-time paths need not exist here: the weights come from the checkpoint itself.
    tree.setdefault("run", {}).update(resume="", path="")
    tree.setdefault("model", {})["pretrained"] = ""
    try:
        return from_dict(Config, tree)
    except ConfigError as e:
        raise InferenceError(f"{path}: its config does not load here: {e}") from None


def load_checkpoint(path: str, device: str = "auto") -> Loaded:
    """Rebuild the model of checkpoint ``path`` (see the module doc) with its weights loaded."""
    from .models import build_model

    try:
        path = ckpt.find_checkpoint(path)
    except FileNotFoundError as e:
        raise InferenceError(str(e)) from None
    meta = ckpt.read_meta(path)
    if meta is None:
        raise InferenceError(f"{path}: no {os.path.basename(path)}.json sidecar, so nothing says "
                             f"which model it holds (use a ddp-train or export-weights checkpoint)")
    cfg = _config(path, meta)
    classes = list(meta.get("classes") or [])
    num_classes = int(meta.get("num_classes") or len(classes))
    classes = classes or [str(i) for i in range(num_classes)]
    inputs = meta.get("inputs") or {}
    try:
        weights = ckpt.read_weights(path)
        model = build_model(cfg.model, num_classes, cfg.multimodal, inputs)
        model.load_state_dict(weights)
    except (ckpt.CheckpointError, ConfigError, KeyError, RuntimeError) as e:
        raise InferenceError(f"{path}: cannot rebuild the model: "
                             f"{str(e).splitlines()[0]}") from None
    dev = _device(device)
    model.to(dev).eval()
    return Loaded(path, model, cfg, classes, float(meta.get("temperature") or 1.0), inputs, dev)


def inference_model(loaded: Loaded, tta: Optional[TTAConfig], temperature: float) -> nn.Module:
    """The bare model, with TTA views averaged when ``tta``, logits divided by ``temperature``."""
    from .tta import TTAModel

    model = TTAModel(loaded.model, tta) if tta is not None else loaded.model
    return calibrate.TemperatureScaled(model, temperature)


# ------------------------------------------------------------------------------------- eval


def _manifest(shards: str, loaded: Loaded):
    from .shards.manifest import load_manifest

    try:
        manifest = load_manifest(shards)
    except (OSError, ValueError) as e:
        raise InferenceError(str(e)) from None
    if manifest.classes != loaded.classes:
        raise InferenceError(f"{shards}: classes {manifest.classes[:5]}... differ from the "
                             f"checkpoint's {loaded.classes[:5]}...")
    return manifest


def _logits(loaded: Loaded, model: nn.Module, manifest, split: str, batch_size: int,
            workers: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One exact-once pass over ``split``: metrics plus every sample's logits and target."""
    from .data import build_loader
    from .dist import DistInfo
    from .metrics import evaluate

    data = dataclasses.replace(loaded.cfg.data, shards=manifest.root, num_workers=workers)
    dist = DistInfo(device=loaded.device)
    try:
        loader = build_loader(data, dist, split=split, train=False, batch_size=batch_size,
                              seed=loaded.cfg.seed, manifest=manifest)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if not loader.num_samples:
        raise InferenceError(f"split {split!r} of {manifest.root} holds no samples")
    recorder = calibrate.LogitRecorder(nn.CrossEntropyLoss())
    metrics = evaluate(model, loader, recorder, num_classes=len(loaded.classes),
                       class_names=loaded.classes, device=loaded.device, dist=dist)
    return (metrics, *recorder.local())


def evaluate_checkpoint(checkpoint: str, shards: str, *, split: str = "test", tta: bool = False,
                        fit_split: str = "", use_temperature: bool = True, device: str = "auto",
                        batch_size: int = 64, workers: int = 2) -> dict:
    """Accuracy, macro-F1, per-class metrics, NLL and ECE of a checkpoint on ``split``.

    The stored temperature is applied (unless ``use_temperature`` is False); ``fit_split``
    fits a new one on that split first. NLL/ECE are also reported at T = 1 (``*_uncalibrated``).
    """
    loaded = load_checkpoint(checkpoint, device)
    manifest = _manifest(shards, loaded)
    tta_cfg = loaded.cfg.tta if tta else None
    model = inference_model(loaded, tta_cfg, 1.0)
    temperature = loaded.temperature if use_temperature else 1.0
    if fit_split:
        _, fit_logits, fit_targets = _logits(loaded, model, manifest, fit_split, batch_size,
                                             workers)
        temperature = calibrate.fit_temperature(fit_logits, fit_targets,
                                                loaded.cfg.calibration.max_iter)
    metrics, logits, targets = _logits(loaded, model, manifest, split, batch_size, workers)
    metrics.pop("loss")  # CE at T = 1: nll_uncalibrated below
    bins = loaded.cfg.calibration.bins
    rep = calibrate.report(logits, targets, temperature, bins)
    metrics.update(checkpoint=loaded.path, shards=shards, split=split, temperature=temperature,
                   tta_views=model.model.num_views if tta_cfg else 1,  # model: T(TTA(net))
                   nll=rep["nll_after"], ece=rep["ece_after"],
                   nll_uncalibrated=rep["nll_before"], ece_uncalibrated=rep["ece_before"])
    return metrics


def format_metrics(m: dict) -> str:
    """The eval result for a terminal: a summary line and a per-class table."""
    lines = [f"{m['checkpoint']} on {m['shards']} {m['split']}: {m['count']} samples, "
             f"{m['tta_views']} view(s), temperature {m['temperature']:.4f}",
             f"acc {m['acc']:.4f} | macro_f1 {m['macro_f1']:.4f} | nll {m['nll']:.4f} "
             f"(T=1: {m['nll_uncalibrated']:.4f}) | ece {m['ece']:.4f} "
             f"(T=1: {m['ece_uncalibrated']:.4f})",
             format_class_table(m["per_class"])]
    return "\n".join(lines)


def format_class_table(per_class: list[dict]) -> str:
    """The per-class precision / recall / F1 / support table of an eval result."""
    lines = [f"{'class':<20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}"]
    lines += [f"{str(c['class'])[:20]:<20} {c['precision']:>9.4f} {c['recall']:>9.4f} "
              f"{c['f1']:>9.4f} {int(c['support']):>8}" for c in per_class]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- predict

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def image_files(paths: list[str]) -> list[str]:
    """``paths`` with folders expanded to the image files under them (sorted); all must exist."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(d, f) for d, _, names in os.walk(path) for f in names
                            if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise InferenceError(f"{path}: no such image file or folder")
    if not files:
        raise InferenceError(f"no image files in {', '.join(paths)}")
    return files


def _image_samples(loaded: Loaded, files: list[str]) -> Iterator[tuple[dict, Any]]:
    from PIL import Image

    from .data import build_transform

    transform = build_transform(loaded.cfg.data, train=False)
    for path in files:
        try:
            with Image.open(path) as image:
                tensor = transform(image.convert("RGB"))
        except Exception as e:  # PIL raises many types on bad files
            raise InferenceError(f"{path}: not a readable image ({type(e).__name__})") from None
        yield {"path": path}, tensor


def _shard_samples(loaded: Loaded, shards: str, split: str,
                   fold: int = -1) -> Iterator[tuple[dict, Any]]:
    """Every sample of ``split`` in shard order, read and decoded by training's own stream stages
    (unreadable samples are logged and skipped, as in eval), with its key and true label.
    ``fold`` >= 0: the splits as the run ``data.fold=fold`` sees them (its val is that fold)."""
    from .data import build_transform
    from .data.loader import extra_specs
    from .data.stream import ProblemLog, decode_and_transform, read_positions
    from .shards.folds import fold_view
    from .shards.labels import LabelReader

    manifest = _manifest(shards, loaded)
    try:
        manifest = fold_view(manifest, fold)  # itself for fold < 0
        urls, specs = manifest.urls(split), extra_specs(manifest, list(loaded.inputs))
        lengths = list(manifest.split(split).shard_lengths)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    transform, problems = build_transform(loaded.cfg.data, train=False), ProblemLog()
    labels = LabelReader(manifest.label, manifest.classes)
    for pos, raw in read_positions(urls, lengths, list(range(len(urls))), 0, sum(lengths),
                                   problems, labels):
        # one sample at a time so each output stays paired with its raw sample's key
        for inputs, label in decode_and_transform(iter([(pos, raw)]), transform, problems,
                                                  train=False, extras=specs):
            yield {"key": raw["__key__"], "target": loaded.classes[label]}, inputs


def batch_logits(loaded: Loaded, model: nn.Module, samples: Iterable[tuple[dict, Any]],
                 batch_size: int) -> Iterator[tuple[list[dict], torch.Tensor]]:
    """``(ids, inputs)`` samples through ``model`` in batches of up to ``batch_size``: each
    batch's ids and its ``(n, C)`` float32 logits on the CPU (not inference tensors)."""
    from torch.utils.data import default_collate

    from .metrics import to_device

    samples = iter(samples)
    # batches of up to batch_size samples until the iterator is exhausted (the last partial)
    for batch in iter(lambda: list(itertools.islice(samples, batch_size)), []):
        with torch.inference_mode():
            inputs = to_device(default_collate([x for _, x in batch]), loaded.device)
            logits = model(inputs).float().cpu()
        yield [ids for ids, _ in batch], logits.clone()


def predict(checkpoint: str, images: list[str], *, shards: str = "", split: str = "test",
            out: str = "-", tta: bool = False, device: str = "auto",
            batch_size: int = 64) -> int:
    """Write one CSV row per image (or shard sample): path (or key and target), predicted label,
    and one ``prob_<class>`` column per class (softmax of the temperature-scaled logits).
    Returns the number of rows."""
    loaded = load_checkpoint(checkpoint, device)
    if loaded.inputs and not shards:
        raise InferenceError(f"this model also takes {', '.join(loaded.inputs)} inputs: predict "
                             f"from --shards holding them")
    samples = (_shard_samples(loaded, shards, split) if shards
               else _image_samples(loaded, image_files(images)))
    model = inference_model(loaded, loaded.cfg.tta if tta else None, loaded.temperature)
    first = ["key", "target"] if shards else ["path"]
    f = sys.stdout if out == "-" else open(out, "w", newline="", encoding="utf-8")
    rows = 0
    try:
        writer = csv.writer(f)
        writer.writerow(first + ["label"] + [f"prob_{c}" for c in loaded.classes])
        for batch_ids, logits in batch_logits(loaded, model, samples, batch_size):
            for ids, p in zip(batch_ids, torch.softmax(logits, dim=1)):
                writer.writerow([ids[k] for k in first] + [loaded.classes[int(p.argmax())]]
                                + [f"{v:.6f}" for v in p.tolist()])
            rows += len(batch_ids)
    finally:
        if f is not sys.stdout:
            f.close()
    return rows
