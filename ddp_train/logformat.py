"""The run log format in one place: file names, event names, train.log lines, JSON lines.

:class:`ddp_train.runlog.RunLogger` writes the logs through this module and
:mod:`ddp_train.plot.logs` reads them through it, so a reworded line changes both sides (and
breaks tests/test_logformat.py) instead of silently breaking ``ddp-plot --log train.log``.
Each train.log line kind has its ``render_*`` and ``parse_*`` next to each other. The text is
the one earlier versions wrote: old logs must keep parsing. Standard library only, because
``ddp_train.plot`` must run without torch (docs/logs.md describes the format).
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Optional

# ----------------------------------------------------------------------------- names

TRAIN_LOG = "train.log"  # human-readable, one stamped line per message
METRICS = "metrics.jsonl"  # one JSON object per optimizer step, plus event records
EVALS = "eval.jsonl"  # one JSON object per evaluation

EVENT_KEY = "event"  # the key that tells an event record from a step record
# How an event line is found in metrics.jsonl without parsing it: step records never hold this
# key, and compact JSON always writes it exactly so.
EVENT_MARK = b'"event"'

START = "start"
RESUME = "resume"
END = "end"
PREEMPTED = "preempted"
NONFINITE = "nonfinite"
CALIBRATION = "calibration"
CHECKPOINT_FAILED = "checkpoint_failed"
WARNING = "warning"
CONFIG_CHANGED = "config_changed"
TRIAL_REPORT_FAILED = "trial_report_failed"  # a sweep trial could not reach its study
EVENTS = (START, RESUME, END, PREEMPTED, NONFINITE, CALIBRATION, CHECKPOINT_FAILED, WARNING,
          CONFIG_CHANGED, TRIAL_REPORT_FAILED)

# ----------------------------------------------------------------------------- the stamp

STAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # local time: a person reads it next to the job's clock
_STAMP = re.compile(r"(?P<stamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| ")


def stamp(msg: str) -> str:
    """``"2026-11-22 03:14:15 | <msg>"`` with the current local time."""
    return f"{time.strftime(STAMP_FORMAT)} | {msg}"


def split_stamp(line: str) -> Optional[tuple[str, str]]:
    """``(stamp, message)`` of a stamped line; None for any other line (Slurm noise, tracebacks)."""
    m = _STAMP.match(line)
    return (m["stamp"], line[m.end():]) if m else None


# ----------------------------------------------------------------------------- JSON lines

def plain(value: Any) -> Any:
    """Tensors and numpy values -> Python numbers/lists, recursively.

    Duck-typed on ``tolist`` (tensors and numpy both have it) so this module never imports them.
    """
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def nulls(value: Any) -> Any:
    """NaN and +-inf -> None, recursively: JSON has no spelling for them (docs/logs.md)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: nulls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nulls(v) for v in value]
    return value


def dumps(record: dict) -> str:
    """One record (already :func:`plain`) as one compact JSON line, without the newline.

    Compact separators are part of the format: the plot reader's bulk path relies on them.
    """
    return json.dumps(nulls(record), separators=(",", ":"), allow_nan=False)


def loads(line: bytes | str) -> Any:
    """``json.loads``, or None for a line that does not parse (a torn line, garbage)."""
    try:
        return json.loads(line)
    except ValueError:  # also covers bad UTF-8
        return None


def warning_message(record: dict) -> Optional[str]:
    """The message of an event written by ``Logger.warning``, or None if it is no warning.

    A ``checkpoint_failed`` event of earlier versions had no ``message``; its text is rebuilt from
    the fields, as the same launch's train.log line read.
    """
    if isinstance(record.get("message"), str):
        return record["message"]
    if record.get(EVENT_KEY) == CHECKPOINT_FAILED:
        return (f"checkpoint at step {record.get('step')} not saved, training continues: "
                f"{record.get('error')}")
    return None


# ----------------------------------------------------------------------------- train.log lines

def _float(text: str) -> float:
    """``float(text)``, NaN when the text is not a number."""
    try:
        return float(text)
    except ValueError:
        return float("nan")


# step 120/1000 | epoch 1 | loss 0.4312 | lr 1.00e-03 | 512 img/s | eta 0:03:10
# The optional parts after "step N/T": field, how it is written, how it is read back.
_STEP_PARTS = (("epoch", "epoch {}", re.compile(r"epoch (\S+)")),
               ("loss", "loss {:.4f}", re.compile(r"loss (\S+)")),
               ("lr", "lr {:.2e}", re.compile(r"lr (\S+)")),
               ("samples_per_s", "{:.0f} img/s", re.compile(r"(\S+) img/s")))
_STEP_LINE = re.compile(r"step (?P<step>\d+)/(?P<total>\d+) \| (?P<rest>.*)")


def render_step(record: dict, total_steps: int, eta: str) -> str:
    """A step record's line; fields the record lacks are left out, the ETA is given as text."""
    parts = [f"step {record['step']}/{total_steps}"]
    parts += [fmt.format(record[key]) for key, fmt, _ in _STEP_PARTS if key in record]
    parts.append(f"eta {eta}")
    return " | ".join(parts)


def parse_step(msg: str) -> Optional[dict]:
    """``step``, ``total`` and the numbers of a step line (rounded as printed), else None."""
    m = _STEP_LINE.match(msg)
    if not m:
        return None
    values: dict = {"step": int(m["step"]), "total": int(m["total"])}
    for part in m["rest"].split(" | "):
        for key, _, pattern in _STEP_PARTS:
            if found := pattern.fullmatch(part):
                values[key] = _float(found[1])
    return values


# eval val step 40 | loss 0.2500 | acc 0.9000 | macro_f1 0.8500
EVAL_SUMMARY_FIELDS = ("loss", "acc", "macro_f1")
_EVAL_LINE = re.compile(r"eval (?P<split>\S+) step (?P<step>\d+)(?: \| (?P<rest>.*))?$")


def render_eval(record: dict) -> str:
    """The one-line summary of an eval record (its per-class numbers stay in eval.jsonl)."""
    parts = [f"eval {record.get('split', '?')} step {record.get('step', '?')}"]
    parts += [f"{key} {record[key]:.4f}" for key in EVAL_SUMMARY_FIELDS
              if isinstance(record.get(key), (int, float))]
    return " | ".join(parts)


def parse_eval(msg: str) -> Optional[dict]:
    """``split``, ``step`` and every ``name value`` part of an eval line, else None."""
    m = _EVAL_LINE.match(msg)
    if not m:
        return None
    values: dict = {"split": m["split"], "step": int(m["step"])}
    for part in m["rest"].split(" | ") if m["rest"] else ():
        name, _, value = part.partition(" ")
        values[name] = _float(value)
    return values


# run runs/x | resnet18 | 2 rank(s) x batch 16 x accum 1 | 100 updates/epoch | 300 updates
START_LINE_FIELDS = ("run_dir", "model", "world_size", "batch_size", "grad_accum",
                     "updates_per_epoch", "total_steps")
_START_LINE = re.compile(
    r"run (?P<run_dir>.+) \| (?P<model>\S+) \| (?P<world_size>\d+) rank\(s\) x batch "
    r"(?P<batch_size>\d+) x accum (?P<grad_accum>\d+) \| (?P<updates_per_epoch>\d+) "
    r"updates/epoch \| (?P<total_steps>\d+) updates")


def render_start(fields: dict) -> str:
    """The line of a ``start`` event; ``fields`` must hold :data:`START_LINE_FIELDS`."""
    return (f"run {fields['run_dir']} | {fields['model']} | {fields['world_size']} rank(s) x "
            f"batch {fields['batch_size']} x accum {fields['grad_accum']} | "
            f"{fields['updates_per_epoch']} updates/epoch | {fields['total_steps']} updates")


def parse_start(msg: str) -> Optional[dict]:
    """:data:`START_LINE_FIELDS` of a start line (numbers as ints), else None."""
    m = _START_LINE.match(msg)
    if not m:
        return None
    return {k: v if k in ("run_dir", "model") else int(v) for k, v in m.groupdict().items()}


# resumed from runs/x/checkpoints/last.pt at step 120
_RESUME_LINE = re.compile(r"resumed from (?P<path>.*) at step (?P<step>\d+)")


def render_resume(path: str, step: int) -> str:
    """The line of a ``resume`` event."""
    return f"resumed from {path} at step {step}"


def parse_resume(msg: str) -> Optional[dict]:
    """``path`` and ``step`` of a resume line, else None."""
    m = _RESUME_LINE.match(msg)
    return {"path": m["path"], "step": int(m["step"])} if m else None


# stopped: finished 300 updates  /  stopped: preempted by SIGTERM
# One line for both events; the reader tells them apart by the reason's first word.
_STOP_LINE = re.compile(r"stopped: (?P<reason>.*)")


def render_stop(event: str, reason: str) -> str:
    """The line of an ``end`` or ``preempted`` event.

    A preempted reason that does not already say so gets a ``preempted: `` prefix, or the
    reader would take the launch for finished.
    """
    if event == PREEMPTED and not reason.startswith("preempted"):
        reason = f"preempted: {reason}"
    return f"stopped: {reason}"


def parse_stop(msg: str) -> Optional[dict]:
    """``{"event": "end" or "preempted", "reason": ...}`` of a stop line, else None."""
    m = _STOP_LINE.match(msg)
    if not m:
        return None
    return {EVENT_KEY: PREEMPTED if m["reason"].startswith("preempted") else END,
            "reason": m["reason"]}


# WARNING: checkpoint at step 7 not saved, training continues: [Errno 28] No space left
_WARNING_LINE = re.compile(r"WARNING: (?P<message>.*)")


def render_warning(message: str) -> str:
    """The line of a warning."""
    return f"WARNING: {message}"


def parse_warning(msg: str) -> Optional[dict]:
    """``{"message": ...}`` of a warning line, else None."""
    m = _WARNING_LINE.match(msg)
    return {"message": m["message"]} if m else None


def event_line(name: str, fields: dict) -> Optional[str]:
    """The train.log line of an event, or None for events that are JSON-only.

    An event without the fields its line needs (``reason`` for end/preempted, ``path`` for a
    resume, :data:`START_LINE_FIELDS` for a start) gets no line either.
    """
    if name == START and all(key in fields for key in START_LINE_FIELDS):
        return render_start(fields)
    if name == RESUME and "step" in fields and fields.get("path"):
        return render_resume(fields["path"], fields["step"])
    if name in (END, PREEMPTED) and "reason" in fields:
        return render_stop(name, str(fields["reason"]))
    return None


# Line kinds as parse_line names them, in the order they are tried.
_PARSERS = (("step", parse_step), ("eval", parse_eval), (RESUME, parse_resume),
            (START, parse_start), ("stop", parse_stop), (WARNING, parse_warning))


def parse_line(line: str) -> Optional[tuple[str, str, dict]]:
    """``(kind, stamp, fields)`` of a train.log line; None for a line without a stamp.

    ``kind`` is ``step``, ``eval``, ``resume``, ``start``, ``stop``, ``warning``, or
    ``message`` (any other stamped line; ``fields`` is then ``{"message": text}``).
    """
    stamped = split_stamp(line)
    if stamped is None:
        return None
    when, msg = stamped
    for kind, parse in _PARSERS:
        fields = parse(msg)
        if fields is not None:
            return kind, when, fields
    return "message", when, {"message": msg}
