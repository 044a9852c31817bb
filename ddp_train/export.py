"""``ddp-train export RUN --format onnx|torchscript|timm``: a deployable model from a checkpoint.

``ddp-train export --ensemble A B C [--weights ...] --format onnx|torchscript`` exports an
ensemble as one file whose output is its probabilities (:mod:`ddp_train.deploy_ensemble`).

RUN is a run folder (its ``checkpoints/last``) or a checkpoint: a ``.pt`` file (local/DDP) or a
DeepSpeed checkpoint folder, whose ZeRO partitions are consolidated into fp32. Each format
writes its file atomically plus ``<out>.json``, what inference needs (schema
``ddp_train.export/1``: classes, eval transform, input/output contract, checks; see
docs/cv.md):

* ``onnx``: one self-contained ``.onnx`` file with a dynamic batch axis, checked with
  onnxruntime against PyTorch (needs ``pip install 'ddp-train[onnx]'``);
* ``torchscript``: ``torch.jit.trace`` + ``torch.jit.save``, checked the same way;
* ``timm`` (= ``ddp-train export-weights``): ``{"model": state_dict}``, so
  ``timm.create_model(name, num_classes=N, checkpoint_path=OUT)`` loads it; its JSON is also a
  checkpoint sidecar, so ``ddp-train eval/predict`` accept the file.

ONNX and TorchScript graphs output the logits divided by the checkpoint's temperature when it
has one (softmax of them = ``ddp-train predict``'s probabilities); the timm weights are the
bare model.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

from . import checkpoint as ckpt
from .deploy import FORMATS, ExportError

# sidecar keys of the source checkpoint carried into the timm export's sidecar (what eval,
# predict and a resumed fine-tune need from it)
_KEEP = ("model_name", "num_classes", "classes", "image_size", "step", "epoch", "config_hash",
         "engine", "temperature", "inputs", "config")
_SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "timm": ".weights.pt"}


def _default_out(path: str, fmt: str) -> str:
    """Next to the checkpoint: ``last.pt`` / DeepSpeed ``last/`` -> ``last<suffix>``."""
    return os.path.splitext(path.rstrip("/"))[0] + _SUFFIX[fmt]


def export_weights(run: str, out: str = "") -> str:
    """Write the model weights of ``run``'s checkpoint to ``out`` (default: next to it)."""
    return export(run, "timm", out)


def export(run: str, fmt: str, out: str = "", *, opset: Optional[int] = None,
           batch_check: int = 4, report: Callable[[str], None] = lambda line: None) -> str:
    """Export ``run``'s checkpoint as ``fmt`` (see the module doc); returns the written path.

    ``opset`` (ONNX only; default: torch's) and ``batch_check`` (the check's batch size; a
    second check uses batch 1) tune the export; ``report`` receives the check's summary line.
    Raises :class:`~ddp_train.deploy.ExportError` (``code`` 2: bad input, 1: check failed).
    """
    from . import deploy

    deploy.check_options(fmt, opset, batch_check)
    if fmt == "onnx":
        deploy.require_onnx()  # before the (slow) model load: fail fast, write nothing
    try:
        path = ckpt.find_checkpoint(run)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    meta = ckpt.read_meta(path) or {}
    out = out or _default_out(path, fmt)
    if fmt == "timm":
        return _export_timm(path, meta, out)

    from . import calibrate
    from .infer import InferenceError, load_checkpoint

    try:
        loaded = load_checkpoint(path, "cpu")
    except InferenceError as e:
        raise ExportError(str(e)) from None
    if loaded.inputs or loaded.cfg.multimodal.enabled:
        # FiLM models take a dict of image + sensor tensors: neither torch.onnx (a flat tuple of
        # tensors, named inputs per member) nor tracing handles that without a per-model input
        # contract, which nothing deploys yet. The weights export covers them.
        raise ExportError(f"{path}: a multimodal (FiLM) model takes image + "
                          f"{', '.join(loaded.inputs) or 'extra'} inputs; --format {fmt} exports "
                          f"image-only models (use --format timm for its weights)")
    transform = deploy.eval_transform(loaded.cfg.data)
    model = loaded.model  # eval mode, on the CPU
    if meta.get("temperature") is not None:
        # calibrated logits from the graph itself, exactly what predict applies
        model = calibrate.TemperatureScaled(model, loaded.temperature).eval()
    size = transform["image_size"]
    if fmt == "onnx":
        info = deploy.export_onnx(model, out, image_size=size, opset=opset,
                                  batch_check=batch_check)
    else:
        info = deploy.export_torchscript(model, out, image_size=size, batch_check=batch_check)
    checks = info.pop("checks")
    deploy.write_json(out + ".json", deploy.describe(
        fmt, out, path, meta, classes=loaded.classes, transform=transform, multimodal=False,
        checks=checks, extra=info))
    sizes = checks["batches"]
    report(f"max abs difference vs PyTorch: {checks['max_abs_diff']:.3g} (batch {sizes[0]} and "
           f"{sizes[1]}; tolerance {checks['tolerance']:.3g})")
    return out


def _export_timm(path: str, meta: dict, out: str) -> str:
    """``{"model": state_dict}`` + a sidecar that is both a checkpoint sidecar and the export
    JSON. Works without a sidecar or a loadable config too (as export-weights always did): the
    JSON's transform fields are then null."""
    from . import deploy
    from .infer import InferenceError, _config  # the checkpoint's resolved config, as eval's

    weights = ckpt.read_weights(path)
    transform, multimodal, note = None, bool(meta.get("inputs")), {}
    if meta:
        try:
            cfg = _config(path, meta)
            multimodal = multimodal or cfg.multimodal.enabled
            transform = deploy.eval_transform(cfg.data)
        except (InferenceError, ExportError) as e:
            note = {"preprocess_unavailable": str(e)}
    classes = list(meta.get("classes") or [])
    described = deploy.describe("timm", out, path, meta, classes=classes, transform=transform,
                                multimodal=multimodal, checks=None, extra=note)
    keep = {k: meta[k] for k in _KEEP if k in meta}
    ckpt.save_atomic(out, {"model": weights},
                     {**described, **keep, "exported_from": os.path.abspath(path)})
    return out


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the usage too: keep it one line
        raise ExportError(message)


def main(argv: list[str], prog: str = "") -> int:
    """``export RUN|--ensemble A B.. --format F [--weights W] [--out FILE] [--opset N]
    [--batch-check N]``; prints the path.

    ``ddp-train export-weights ARGS`` calls ``main(["--format", "timm", *ARGS],
    prog="ddp-train export-weights")``, so its help and errors carry its own name.
    """
    prog = prog or "ddp-train export"
    p = _OneLineParser(prog=prog, description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("run", nargs="?", default="",
                   help="run folder, checkpoint .pt file or DeepSpeed checkpoint folder")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                   help="export these runs/checkpoints as one ensemble file whose output is "
                        "their weighted mean probability (onnx or torchscript)")
    p.add_argument("--weights", default="", metavar="W1,W2,..",
                   help="--ensemble member weights, normalised to sum 1 (default: equal)")
    p.add_argument("--format", required=True, metavar="|".join(FORMATS), choices=FORMATS,
                   help="onnx: .onnx for onnxruntime/TensorRT; torchscript: traced .pt for "
                        "libtorch; timm: {'model': state_dict} for timm.create_model")
    p.add_argument("--out", default="", help="output file (default: next to the checkpoint, "
                   "last.onnx / last.torchscript.pt / last.weights.pt); <out>.json beside it")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: torch's; below 18 uses the legacy exporter)")
    p.add_argument("--batch-check", type=int, default=4, metavar="N",
                   help="check the export against PyTorch on a random batch of N and of 1 "
                        "(default 4)")
    try:
        args = p.parse_args(argv)
        report = lambda line: print(line, file=sys.stderr)  # noqa: E731
        if bool(args.run) == bool(args.ensemble):
            raise ExportError("give RUN or --ensemble A B ... (one of them)")
        if args.ensemble:
            from .deploy_ensemble import export_ensemble
            from .ensemble import parse_weights
            from .infer import InferenceError

            try:
                weights = parse_weights(args.weights, len(args.ensemble))
            except InferenceError as e:
                raise ExportError(str(e)) from None
            out = export_ensemble(args.ensemble, args.format, args.out, weights=weights,
                                  opset=args.opset, batch_check=args.batch_check, report=report)
        elif args.weights:
            raise ExportError("--weights applies to --ensemble only")
        else:
            out = export(args.run, args.format, args.out, opset=args.opset,
                         batch_check=args.batch_check, report=report)
    except ExportError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code
    except (OSError, ckpt.CheckpointError) as e:
        print(f"{prog}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    print(out)
    return 0
