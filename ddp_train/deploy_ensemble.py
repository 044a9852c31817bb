"""``ddp-train export --ensemble A B C``: one ONNX/TorchScript file whose output is the
ensemble's probabilities.

The graph takes one normalised NCHW batch and computes what :class:`ddp_train.ensemble.Ensemble`
computes (without TTA)::

    probabilities = sum_m w_m * softmax(logits_m(x) / T_m)

so a deployment runs one file and reads the ensemble's probabilities directly. A single input
needs a single preprocessing: every member must have the same eval transform (image size,
resize size, crop_pct, interpolation, mean, std), otherwise the export refuses (exit 2) rather
than feed some member images it was never evaluated on. The file is written and checked
against the PyTorch ensemble by :mod:`ddp_train.deploy`'s exporters (atomic write, runtime
check), with an absolute tolerance: probabilities lie in [0, 1].
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from . import deploy
from .deploy import ExportError

OUTPUT_NAME = "probabilities"
# float32 softmax + weighted sum in another runtime differ from PyTorch by ~1e-7 (rounding);
# a wrong graph (a member dropped, a temperature or weight lost) moves probabilities by >> 1e-3.
PROB_ABS_TOL = 1e-5
# the eval transform's fields that must agree, in the order a mismatch is reported
TRANSFORM_FIELDS = ("image_size", "resize_size", "crop_pct", "interpolation", "mean", "std")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


class EnsembleModule(nn.Module):
    """``sum_m w_m * softmax(members[m](x) / T_m)`` for one input batch ``x``: float32
    probabilities of shape ``(batch, classes)``, each row summing to 1.

    ``weights`` are normalised to sum 1 (:func:`ddp_train.ensemble.normalise_weights`);
    ``temperatures`` are one per member (1.0: uncalibrated). Both are Python floats, so they
    become constants of an exported graph.
    """

    def __init__(self, members: Sequence[nn.Module], weights: Optional[Sequence[float]],
                 temperatures: Sequence[float]) -> None:
        from .ensemble import normalise_weights

        super().__init__()
        if not members or len(temperatures) != len(members):
            raise ValueError(f"{len(members)} members and {len(temperatures)} temperatures")
        self.members = nn.ModuleList(members)
        self.weights = normalise_weights(weights, len(members))
        self.temperatures = [float(t) for t in temperatures]
        self.train(members[0].training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = None
        # a Python loop over a ModuleList: unrolled by torch.export and torch.jit.trace
        for member, weight, temperature in zip(self.members, self.weights, self.temperatures):
            p = weight * torch.softmax(member(x).float() / temperature, dim=1)
            probs = p if probs is None else probs + p
        return probs


def shared_transform(transforms: Sequence[dict], names: Sequence[str]) -> dict:
    """The one eval transform all members share; ExportError (exit 2) naming the first member
    that differs from the first one and the first differing field."""
    first = transforms[0]
    for transform, name in zip(transforms[1:], names[1:]):
        field = next((f for f in TRANSFORM_FIELDS if transform[f] != first[f]), None)
        if field is not None:
            raise ExportError(f"ensemble members {names[0]} and {name} have different eval "
                              f"transforms ({field} {first[field]} vs {transform[field]}): an "
                              f"exported ensemble takes one input batch, so its members must "
                              f"share {', '.join(TRANSFORM_FIELDS)}")
    return first


def export_ensemble(checkpoints: Sequence[str], fmt: str, out: str = "", *,
                    weights: Optional[Sequence[float]] = None, opset: Optional[int] = None,
                    batch_check: int = 4,
                    report: Callable[[str], None] = lambda line: None) -> str:
    """Export the ensemble of ``checkpoints`` (run folders / checkpoints, as ``ddp-train eval
    --ensemble`` takes them) as one ``fmt`` file (onnx or torchscript); returns its path.

    ``out`` defaults to ``ensemble.onnx`` / ``ensemble.torchscript.pt`` in the current folder
    (the members' runs are equals: none of their folders is the natural home). ``weights``,
    ``opset``, ``batch_check`` and ``report`` are as for :func:`ddp_train.export.export`.
    Raises :class:`~ddp_train.deploy.ExportError` (``code`` 2: bad input, 1: check failed).
    """
    from .ensemble import check_classes, normalise_weights
    from .infer import InferenceError, load_checkpoint

    if fmt == "timm":
        raise ExportError("--format timm cannot hold an ensemble (a state dict is one model's "
                          "weights): use --format onnx or torchscript with --ensemble")
    deploy.check_options(fmt, opset, batch_check, formats=("onnx", "torchscript"))
    names = list(checkpoints)
    try:
        weights = normalise_weights(weights, len(names))  # before any (slow) model load
        if fmt == "onnx":
            deploy.require_onnx()
        members = [load_checkpoint(name, "cpu") for name in names]
        check_classes(members, names)
    except InferenceError as e:
        raise ExportError(str(e)) from None
    for loaded, name in zip(members, names):
        if loaded.inputs or loaded.cfg.multimodal.enabled:  # see export.export
            raise ExportError(f"{name}: a multimodal (FiLM) model takes image + "
                              f"{', '.join(loaded.inputs) or 'extra'} inputs; --format {fmt} "
                              f"exports image-only models")
    transform = shared_transform([deploy.eval_transform(m.cfg.data) for m in members], names)
    temperatures = [m.temperature for m in members]  # 1.0 where none was fitted, as Ensemble
    model = EnsembleModule([m.model for m in members], weights, temperatures).eval()
    out = out or os.path.abspath("ensemble" + _SUFFIX[fmt])
    size = transform["image_size"]
    if fmt == "onnx":
        info = deploy.export_onnx(model, out, image_size=size, opset=opset,
                                  batch_check=batch_check, output_name=OUTPUT_NAME,
                                  abs_tol=PROB_ABS_TOL)
    else:
        info = deploy.export_torchscript(model, out, image_size=size, batch_check=batch_check,
                                         abs_tol=PROB_ABS_TOL)
    checks = info.pop("checks")
    deploy.write_json(out + ".json", describe_ensemble(fmt, out, members, model, transform,
                                                       checks, info))
    sizes = checks["batches"]
    report(f"max abs difference vs PyTorch: {checks['max_abs_diff']:.3g} (batch {sizes[0]} and "
           f"{sizes[1]}; tolerance {checks['tolerance']:.3g})")
    return out


def describe_ensemble(fmt: str, out: str, members: Sequence, model: EnsembleModule,
                      transform: dict, checks: dict, info: dict) -> dict:
    """The single-model JSON (:func:`ddp_train.deploy.describe`) with the ensemble's output
    contract and a ``members`` list; single-model keys without one value (``model_name``,
    ``temperature``, ``source.checkpoint``) are null, the per-member values are in ``members``."""
    classes = list(members[0].classes)
    entries = []
    for loaded, weight, temperature in zip(members, model.weights, model.temperatures):
        meta = ckpt.read_meta(loaded.path) or {}
        entries.append({"checkpoint": os.path.abspath(loaded.path),
                        "model_name": meta.get("model_name", loaded.cfg.model.name),
                        "weight": weight, "temperature": temperature,
                        "temperature_fitted": meta.get("temperature") is not None,
                        **{k: meta.get(k) for k in ("step", "epoch", "engine", "config_hash")}})
    output = {"name": OUTPUT_NAME, "kind": "probabilities", "shape": ["batch", len(classes)],
              "temperature_applied": True,
              "probabilities": "the output itself: sum over members of weight * "
                               "softmax(logits / temperature); rows sum to 1",
              "combine": "weighted mean of the members' probabilities"}
    source = {"checkpoint": None, "step": None, "epoch": None, "engine": None,
              "config_hash": None, "ensemble_of": len(entries)}
    return deploy.describe(fmt, out, "", {}, classes=classes, transform=transform,
                           multimodal=False, checks=checks,
                           extra={**info, "output": output, "source": source,
                                  "members": entries})
