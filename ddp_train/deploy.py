"""ONNX and TorchScript exports of a checkpoint, checked against PyTorch, plus the inference JSON.

``ddp-train export`` (``export.py``) is the command line; this module does the work:

* :func:`export_onnx` / :func:`export_torchscript` write the eval-mode model (logits divided by
  the checkpoint's temperature when it has one) to a temp file next to ``out``, run it in its
  target runtime (onnxruntime on the CPU / ``torch.jit.load``) on random batches of two sizes,
  compare with the PyTorch model and only then rename it over ``out``: a file at ``out`` has
  passed its check, and a failed export leaves nothing behind.
* :func:`describe` builds the JSON (schema :data:`SCHEMA`) a deployment needs: classes, the
  input/output contract and the eval transform read from the very transform object the eval
  loader builds (:func:`eval_transform`), so preprocessing can be re-implemented from the JSON
  alone (docs/cv.md has a PIL + numpy version).

Everything runs on the CPU: export is a one-off, and CPU float32 is the reference the runtimes
are compared with.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .config import DataConfig

SCHEMA = "ddp_train.export/1"  # bump on an incompatible change of the JSON's keys or meaning
FORMATS = ("onnx", "torchscript", "timm")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
# A check passes when max |exported - PyTorch| <= REL_TOL * max(1, max |PyTorch logit|): float32
# kernels of another runtime differ by rounding (1e-7..1e-6 relative measured), so 1e-4 leaves a
# wide margin while still catching a wrong graph (a mis-traced branch differs by O(logit)).
REL_TOL = 1e-4
# torch.onnx's default (dynamo, torch.export-based) exporter implements opsets >= 18 only; a
# lower --opset is "converted" by a best-effort pass that silently keeps 18 when it fails.
MIN_DYNAMO_OPSET = 18
PIP_ONNX = "pip install 'ddp-train[onnx]'"


class ExportError(ValueError):
    """An export that cannot be done or did not pass its check; the CLI prints it as one line.

    ``code`` is the exit status: 2 for bad input (path, format, options, missing package,
    unsupported model), 1 for an exported file that does not reproduce PyTorch.
    """

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def check_options(fmt: str, opset: Optional[int], batch_check: int,
                  formats: Sequence[str] = FORMATS) -> None:
    """ExportError for an unknown format (of ``formats``), ``--opset`` off ONNX, or a
    ``--batch-check`` below 1: checked before any model is loaded."""
    if fmt not in formats:
        raise ExportError(f"--format {fmt!r}: choose from {', '.join(formats)}")
    if opset is not None and fmt != "onnx":
        raise ExportError(f"--opset applies to --format onnx only (not {fmt})")
    if batch_check < 1:
        raise ExportError(f"--batch-check {batch_check}: must be >= 1")


# ---------------------------------------------------------------------------- the JSON


def eval_transform(data: DataConfig) -> dict[str, Any]:
    """The eval transform's parameters, read from the transform the eval loader builds.

    ``ddp_train.data.build_transform(train=False)`` is timm's eval transform: Resize (shorter
    side), CenterCrop, ToTensor, Normalize. The values are taken from those objects (not
    recomputed from the config) and any other step raises :class:`ExportError`: a JSON that
    described a different transform than the one the model was evaluated with would silently
    degrade accuracy in deployment.
    """
    from torchvision import transforms as T

    from .data import build_transform

    resize = crop = norm = None
    for step in build_transform(data, train=False).transforms:
        if isinstance(step, T.Resize) and resize is None and (
                isinstance(step.size, int) or len(step.size) == 1):  # one int: shorter side
            resize = step
        elif isinstance(step, T.CenterCrop) and crop is None:
            crop = step
        elif isinstance(step, T.Normalize) and norm is None:
            norm = step
        elif not isinstance(step, T.ToTensor):  # timm's MaybeToTensor subclasses ToTensor
            raise ExportError(f"the eval transform has a step the export JSON cannot describe: "
                              f"{step!r}")
    if resize is None or crop is None or norm is None or tuple(crop.size) != (
            data.image_size, data.image_size):
        raise ExportError("the eval transform is not resize-shorter-side + centre-crop + "
                          "normalise, which the export JSON describes")
    # timm: floor(image_size / crop_pct); read back rather than recomputed
    size = resize.size if isinstance(resize.size, int) else resize.size[0]
    # mean/std as configured (0.485, not the float32 0.48500001...) once they are shown to be
    # what Normalize holds: a float32 array of either list is the same
    mean, std = [float(v) for v in data.mean], [float(v) for v in data.std]
    if not (torch.equal(torch.as_tensor(norm.mean, dtype=torch.float32), torch.tensor(mean))
            and torch.equal(torch.as_tensor(norm.std, dtype=torch.float32), torch.tensor(std))):
        raise ExportError(f"the eval transform normalises with {norm!r}, not data.mean/std")
    return {"image_size": int(data.image_size), "resize_size": int(size),
            "interpolation": resize.interpolation.value, "crop_pct": float(data.crop_pct),
            "mean": mean, "std": std}


def _steps(t: dict[str, Any]) -> list[str]:
    """The transform in words, precise enough to re-implement (it is torchvision on PIL)."""
    r, s = t["resize_size"], t["image_size"]
    return [
        "decode the image and convert it to RGB (PIL Image.convert('RGB'))",
        f"resize so the shorter side is {r} px (= floor(image_size / crop_pct)); the longer "
        f"side becomes int({r} * long / short) (truncated); PIL Image.resize with resample = "
        f"'{t['interpolation']}' (PIL's resize is antialiased); skipped if the size is unchanged",
        f"centre crop {s} x {s}: top = round((height - {s}) / 2), left = round((width - {s}) / 2) "
        f"with Python's round (halves to even)",
        "to float32 in [0, 1]: pixel / 255, HWC -> CHW",
        "normalise each channel: (x - mean[c]) / std[c]",
        "stack into an NCHW float32 batch",
    ]


def describe(fmt: str, out: str, source: str, meta: dict, *, classes: list[str],
             transform: Optional[dict], multimodal: bool, checks: Optional[dict],
             extra: Optional[dict] = None) -> dict:
    """The JSON written next to an export (schema :data:`SCHEMA`, docs/cv.md).

    ``source`` is the checkpoint exported and ``meta`` its sidecar, ``transform``
    :func:`eval_transform`'s result (None when it cannot be described), ``checks`` the runtime
    comparison (None for timm).
    """
    temperature = meta.get("temperature")
    size = transform["image_size"] if transform else None
    described = {
        "schema": SCHEMA,
        # not "format": the timm export's JSON is also its checkpoint sidecar, whose "format"
        # is the checkpoint file format (ddp_train.checkpoint/N).
        "export_format": fmt,
        "file": os.path.basename(out),
        "model_name": meta.get("model_name"),
        "num_classes": len(classes),
        "classes": classes,
        "multimodal": multimodal,
        "temperature": float(temperature) if temperature is not None else None,
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                  "shape": ["batch", 3, size, size],
                  "values": "normalised: (pixel / 255 - mean) / std, per channel"},
        "output": {"name": OUTPUT_NAME, "kind": "logits", "shape": ["batch", len(classes)],
                   # the graph already divides by the temperature: softmax(output) gives the
                   # calibrated probabilities ddp-train predict reports, argmax the label
                   "temperature_applied": fmt != "timm" and temperature is not None,
                   "probabilities": "softmax over axis 1"},
        **(transform or dict.fromkeys(("image_size", "resize_size", "interpolation",
                                       "crop_pct", "mean", "std"))),
        "preprocess": _steps(transform) if transform else None,
        "source": {"checkpoint": os.path.abspath(source),
                   **{k: meta.get(k) for k in ("step", "epoch", "engine", "config_hash")}},
        "checks": checks,
        "versions": _versions(fmt),
        "exported_at": time.time(),
    }
    return {**described, **(extra or {})}


def _versions(fmt: str) -> dict[str, str]:
    import timm

    found = {"torch": torch.__version__, "timm": timm.__version__}
    if fmt == "onnx":
        import onnx
        import onnxruntime

        found.update(onnx=onnx.__version__, onnxruntime=onnxruntime.__version__)
    return found


def write_json(path: str, data: dict) -> None:
    """Atomically write ``data`` as indented JSON to ``path``."""
    text = json.dumps(data, indent=2, default=str) + "\n"
    with _atomic(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[str]:
    """Yield a temp path next to ``path``; on success fsync it and rename it over ``path``.

    The exporters and checks work on the temp file (torch.onnx and torch.jit want a path, not
    the file object ``checkpoint.files`` writes through); any exception removes it, so ``path``
    is either the previous file or a complete, checked new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # same folder, so an atomic rename
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -------------------------------------------------------------------------- the checks


def _batches(batch_check: int, image_size: int) -> list[torch.Tensor]:
    """Two random normalised-input batches: ``batch_check`` and another size (1, or 2 when
    ``batch_check`` is 1), so a graph that fixed its batch dimension fails the check."""
    gen = torch.Generator().manual_seed(0)
    other = 1 if batch_check != 1 else 2
    return [torch.randn(n, 3, image_size, image_size, generator=gen) for n in (batch_check, other)]


def _compare(model: torch.nn.Module, run: Callable[[torch.Tensor], torch.Tensor],
             batches: list[torch.Tensor], runtime: str, abs_tol: Optional[float] = None) -> dict:
    """max |run(x) - model(x)| over ``batches``; :class:`ExportError` (exit 1) above tolerance.

    The tolerance is relative to the logit scale (:data:`REL_TOL`), or ``abs_tol`` when given:
    outputs bounded by 1 (probabilities) need no scale."""
    diff, scale = 0.0, 1.0
    for x in batches:
        with torch.no_grad():
            ref = model(x).float()
        try:
            got = run(x)
        except Exception as e:  # runtimes raise their own types (onnxruntime: Fail, ...)
            raise ExportError(f"{runtime} cannot run the exported model on a batch of "
                              f"{len(x)}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                              code=1) from None
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportError(f"{runtime}: output shape {tuple(got.shape)} for a batch of "
                              f"{len(x)}, PyTorch gives {tuple(ref.shape)}", code=1)
        diff = max(diff, float((got.float() - ref).abs().max()))  # nan propagates: fails below
        scale = max(scale, float(ref.abs().max()))
    tolerance = REL_TOL * scale if abs_tol is None else abs_tol
    sizes = [len(x) for x in batches]
    rule = (f"max_abs_diff <= {REL_TOL:g} * logit_scale, logit_scale = max(1, max |PyTorch "
            f"logit|)" if abs_tol is None else f"max_abs_diff <= {abs_tol:g} (absolute)")
    checks = {"runtime": runtime, "batches": sizes, "inputs": "torch.randn, seed 0",
              "max_abs_diff": diff, "logit_scale": scale, "tolerance": tolerance, "rule": rule}
    if not diff <= tolerance:  # also catches nan
        raise ExportError(f"max abs difference vs PyTorch: {diff:.3g} (batch {sizes[0]} and "
                          f"{sizes[1]}) is above the tolerance {tolerance:.3g}: the exported "
                          f"model does not reproduce the checkpoint", code=1)
    return checks


# ---------------------------------------------------------------------------------- ONNX


def require_onnx() -> None:
    """ExportError (exit 2) naming the extra to install when onnx/onnxscript/onnxruntime lack."""
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: {PIP_ONNX}")


def _onnx_export(model: torch.nn.Module, x: torch.Tensor, path: str,
                 opset: Optional[int], output_name: str = OUTPUT_NAME) -> str:
    """Export with a dynamic batch axis; returns the exporter used ("dynamo" or "legacy").

    torch 2.14's default exporter (torch.export + onnxscript) is tried first. The legacy
    TorchScript-based one (deprecated, still shipped) is used when an opset below
    :data:`MIN_DYNAMO_OPSET` is asked for, and as a fallback when torch.export cannot capture
    the model with a symbolic batch size (data-dependent control flow or a batch size baked into
    a reshape): it traces with the example batch and marks axis 0 dynamic, and the batch-1 check
    afterwards tells whether that was right.
    """
    names = dict(input_names=[INPUT_NAME], output_names=[output_name])
    first_error = ""
    if opset is None or opset >= MIN_DYNAMO_OPSET:
        try:
            # verbose=False: no "[torch.onnx] Obtain model graph..." progress on stdout.
            # dynamic_shapes positional (a tuple), not {"x": ...}: the exported module is either
            # the timm model (forward(x)) or calibrate.TemperatureScaled (forward(inputs)).
            torch.onnx.export(model, (x,), path, dynamo=True, external_data=False,
                              verbose=False, opset_version=opset,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            return "dynamo"
        except Exception as e:  # torch.export raises many types (UserError, Unsupported, ...)
            first_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        with warnings.catch_warnings():
            # "You are using the legacy TorchScript-based ONNX export" / "will be removed": we
            # chose it deliberately (see above) and the JSON records exporter="legacy".
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
                              **names)
        return "legacy"
    except Exception as e:
        second = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ExportError(f"torch.onnx cannot export {type(model).__name__}: "
                          f"{first_error + '; legacy exporter: ' if first_error else ''}{second}",
                          code=1) from None


def export_onnx(model: torch.nn.Module, out: str, *, image_size: int, opset: Optional[int] = None,
                batch_check: int = 4, output_name: str = OUTPUT_NAME,
                abs_tol: Optional[float] = None) -> dict:
    """Write ``model`` (eval mode, CPU) as a single-file ONNX graph with a dynamic batch axis.

    Weights are inside the file (``external_data=False``; protobuf limits that to 2 GB). The
    file is checked with onnxruntime's CPUExecutionProvider against PyTorch before it replaces
    ``out`` (``abs_tol``: see :func:`_compare`). Returns the JSON's ``checks`` plus ``exporter``
    and ``opset``.
    """
    require_onnx()
    import onnx
    import onnxruntime as ort

    batches = _batches(batch_check, image_size)
    with _atomic(out) as tmp:
        exporter = _onnx_export(model, batches[0], tmp, opset, output_name)
        got_opset = next((o.version for o in onnx.load(tmp, load_external_data=False).opset_import
                          if o.domain in ("", "ai.onnx")), None)
        if opset is not None and got_opset != opset:
            raise ExportError(f"--opset {opset}: the exporter wrote opset {got_opset}", code=1)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the same CPU share as torch
        session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        checks = _compare(model, run, batches, f"onnxruntime {ort.__version__} "
                                               f"CPUExecutionProvider", abs_tol)
        del session  # release the file before the rename (Windows keeps it open otherwise)
    return {"checks": checks, "exporter": exporter, "opset": got_opset, "dynamic_batch": True}


# --------------------------------------------------------------------------- TorchScript


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    # torch 2.14 marks torch.jit.trace/save/load deprecated in favour of torch.export. The
    # TorchScript file is still what libtorch (C++), Triton's pytorch backend and older serving
    # stacks load, and that is why one asks for this format, so the notice is not actionable
    # here. Only those notices are hidden: TracerWarnings (a trace that may not generalise)
    # still show, and the two-batch-size check below catches a trace that does not.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated")
        yield


def export_torchscript(model: torch.nn.Module, out: str, *, image_size: int,
                       batch_check: int = 4, abs_tol: Optional[float] = None) -> dict:
    """Write ``model`` traced with ``torch.jit.trace`` (eval mode, CPU) via ``torch.jit.save``.

    Tracing, not ``torch.jit.script``: scripting fails on many timm models (their forward uses
    Python features TorchScript does not compile). The file is re-loaded and checked against
    PyTorch on two batch sizes before it replaces ``out``. Returns the JSON's ``checks``.
    """
    batches = _batches(batch_check, image_size)
    with _atomic(out) as tmp:
        with _quiet_jit(), torch.no_grad():
            traced = torch.jit.trace(model, batches[0])
            torch.jit.save(traced, tmp)
            loaded = torch.jit.load(tmp, map_location="cpu")

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return loaded(x)

        checks = _compare(model, run, batches, f"torch.jit {torch.__version__}", abs_tol)
    return {"checks": checks, "dynamic_batch": True}

