"""Read a run's logs into tables: metrics.jsonl and eval.jsonl, or the human-readable train.log.

The format is described in docs/logs.md and lives in :mod:`ddp_train.logformat`, which the
writer uses too: file names, event names, JSON decoding and every train.log line come from there.
Two of its rules shape this module:

* **Later records win.** A resumed run restarts from its checkpoint's step, so the steps between
  that checkpoint and the kill appear twice. The last record of each step is kept (of each
  ``(split, step)`` for evals), as in the reference reader of docs/logs.md.
* **A torn line is not an error.** A killed job, or one still writing, can leave half a line at
  the end of a launch. Lines that do not parse are skipped.

metrics.jsonl can hold millions of lines, too many for one ``json.loads`` per line. The step
lines of one launch all have the same keys in the same order, so they are rewritten into CSV
(one ``bytes.translate``) and parsed by pandas' C reader in bulk, in pieces of ~16 MB on all
cores; every key column is then checked to hold one key only. A piece that fails the check is
parsed line by line instead.
"""
from __future__ import annotations

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from .. import logformat as fmt

# Step-record fields the figures and the report use; others (grad_norm, gpu_mem_gb) are not read.
STEP_FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s", "data_s", "step_s", "time")
REQUIRED_FIELDS = ("step", "epoch", "loss")

PIECE_BYTES = 16 << 20  # step lines are parsed in pieces of ~16 MB (~50,000 lines)
# '{"step":1,"loss":0.5}' -> ',"step",1,"loss",0.5,': keys and values become alternating CSV
# fields, framed by an empty field at each end.
_JSON_TO_CSV = bytes.maketrans(b"{:}", b",,,")
# How a skipped update's extra key reads inside a step line (',"skipped":true').
_SKIPPED = b"," + fmt.dumps({"skipped": True})[1:-1].encode()


class LogError(Exception):
    """A log that cannot be plotted. The CLI prints the message as a single line."""


@dataclass
class Run:
    """Everything read from one run's logs."""

    name: str  # the run folder's name, used as the legend label
    source: str  # the file the steps were read from
    steps: pd.DataFrame  # one row per step (later records win), sorted; columns from STEP_FIELDS
    evals: list = field(default_factory=list)  # eval records, later wins per (split, step)
    starts: list = field(default_factory=list)  # "start" events: one per launch, in order
    resumes: list = field(default_factory=list)  # steps at which a launch resumed
    end: Optional[dict] = None  # the "end" event of the last launch; None while running/killed
    preempted: Optional[dict] = None  # the "preempted" event of the last launch, if it had one
    # Warning events in file order, each with "event" and "message" (from a text log the event
    # is "warning": its WARNING line does not name the event).
    warnings: list = field(default_factory=list)
    replaced: int = 0  # step records superseded by a later record of the same step
    split: Optional[str] = None  # the eval split that picks the best eval (--split); None: val
    # Seconds from the first to the last stamped line of a text log. Its stamps are the training
    # machine's local time, not comparable with eval.jsonl's unix times, so they stay apart.
    text_wall_s: Optional[float] = None


def load_run(path: str) -> Run:
    """Read a run given its folder, its ``metrics.jsonl``, or a text log (``train.log``).

    Evals come from the ``eval.jsonl`` next to the file; a text log without one falls back to its
    own ``eval ...`` summary lines (no per-class numbers then). Raises :class:`LogError`.
    """
    path = _log_file(os.path.normpath(path))
    with open(path, "rb") as f:
        data = f.read()
    head = data.lstrip()[:1]
    if not head:
        raise LogError(f"{path}: the file is empty")
    run = _parse_metrics(data) if head == b"{" else _parse_text_log(data)
    run.source = path
    folder = os.path.dirname(os.path.abspath(path))
    run.name = os.path.basename(folder)
    if os.path.basename(os.path.dirname(folder)) == "trials":  # <sweep>/trials/<number>
        run.name = f"trial {run.name}"
    if len(run.steps) == 0:
        raise LogError(f"{path}: no step records (expected metrics.jsonl or train.log lines)")
    missing = [name for name in REQUIRED_FIELDS if name not in run.steps]
    if missing:
        raise LogError(f"{path}: step records have no {', '.join(missing)} field")
    if run.steps["loss"].isna().all():
        raise LogError(f"{path}: no step has a finite loss (every loss is null)")
    if run.steps["epoch"].isna().any():
        raise LogError(f"{path}: step records without an epoch")
    eval_path = os.path.join(folder, fmt.EVALS)
    if os.path.isfile(eval_path):
        run.evals = read_evals(eval_path)
    return run


def _log_file(path: str) -> str:
    """The file to read for ``path``: itself, or the log inside a run folder."""
    if os.path.isdir(path):
        for name in (fmt.METRICS, fmt.TRAIN_LOG):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise LogError(f"{path}: no {fmt.METRICS} or {fmt.TRAIN_LOG} in this folder")
    if not os.path.isfile(path):
        raise LogError(f"{path}: no such file or folder")
    return path


# ----------------------------------------------------------------------------- metrics.jsonl

def _parse_metrics(data: bytes) -> Run:
    """A Run from the bytes of a metrics.jsonl (name, source and evals are filled in later)."""
    blocks, events = _split_at_events(data)
    pieces = [piece for start, end in blocks
              for piece in _cut(data, start, _end_without_torn_line(data, start, end))]
    # pandas' C reader releases the GIL while it tokenizes, so pieces parse in parallel threads.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        frames = list(pool.map(lambda piece: _parse_steps(data[piece[0]:piece[1]]), pieces))
    frames = [frame for frame in frames if len(frame)]
    steps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    steps, replaced = later_wins(steps)
    end, preempted = _last_launch_outcome(events)
    warnings = [{**e, "message": message} for e in events
                if (message := fmt.warning_message(e)) is not None]
    return Run(name="", source="", steps=steps, replaced=replaced,
               starts=[e for e in events if e[fmt.EVENT_KEY] == fmt.START],
               resumes=[int(e["step"]) for e in events if e[fmt.EVENT_KEY] == fmt.RESUME],
               end=end, preempted=preempted, warnings=warnings)


def _last_launch_outcome(events: list[dict]) -> tuple[Optional[dict], Optional[dict]]:
    """The ``end`` and ``preempted`` events after the last ``start`` (a later launch makes an
    earlier end or preemption history, not the run's state)."""
    starts = [i for i, e in enumerate(events) if e[fmt.EVENT_KEY] == fmt.START]
    last = events[starts[-1] + 1:] if starts else events
    ends = [e for e in last if e[fmt.EVENT_KEY] == fmt.END]
    stops = [e for e in last if e[fmt.EVENT_KEY] == fmt.PREEMPTED]
    return (ends[-1] if ends else None), (stops[-1] if stops else None)


def _split_at_events(data: bytes) -> tuple[list[tuple[int, int]], list[dict]]:
    """Cut the file at its event lines: ``(start, end)`` of the step-line blocks between them,
    and the parsed events.

    Events are rare (a few per launch), so they are found with ``bytes.find`` instead of
    splitting millions of lines; each block is then one launch's steps (or part of them).
    """
    blocks, events, pos = [], [], 0
    while (hit := data.find(fmt.EVENT_MARK, pos)) != -1:
        start = data.rfind(b"\n", 0, hit) + 1
        end = data.find(b"\n", hit)
        end = len(data) if end == -1 else end + 1
        blocks.append((pos, start))
        event = fmt.loads(data[start:end])
        if isinstance(event, dict) and fmt.EVENT_KEY in event:
            events.append(event)
        pos = end
    blocks.append((pos, len(data)))
    return blocks, events


def _end_without_torn_line(data: bytes, start: int, end: int) -> int:
    """Where the block ``data[start:end]`` ends once a last line that does not parse is dropped.

    A kill mid-write tears the last line of a launch, and the next launch's first record is an
    event, so a torn line is always the last one of a block. Dropping it here keeps the block
    uniform for the bulk parser.
    """
    body_end = end
    while body_end > start and data[body_end - 1:body_end].isspace():
        body_end -= 1
    last = max(data.rfind(b"\n", start, body_end) + 1, start)
    return end if fmt.loads(data[last:body_end]) is not None else last


def _cut(data: bytes, start: int, end: int) -> list[tuple[int, int]]:
    """Split ``data[start:end]`` at line ends into spans of about :data:`PIECE_BYTES`."""
    spans = []
    while end - start > PIECE_BYTES:
        cut = data.find(b"\n", start + PIECE_BYTES, end)
        if cut == -1:
            break
        spans.append((start, cut + 1))
        start = cut + 1
    return spans + [(start, end)]


def _parse_steps(chunk: bytes) -> pd.DataFrame:
    """The step records of a block of lines: bulk-parsed when uniform, else line by line."""
    if not chunk or chunk.isspace():
        return pd.DataFrame()
    try:
        return _parse_steps_bulk(chunk)
    except ValueError:  # not uniform: another key order, a garbage line, a string value...
        return _parse_steps_by_line(chunk)


def _parse_steps_bulk(chunk: bytes) -> pd.DataFrame:
    """Parse a block whose lines all have the first line's keys, in order; ValueError if not."""
    # A skipped update (fp16 overflow) adds one key to its line; the figures do not use it, and
    # dropping it keeps the block uniform, so runs with many overflows stay on the fast path.
    chunk = chunk.replace(_SKIPPED, b"")
    first_end = chunk.find(b"\n")
    first = json.loads(chunk[:first_end] if first_end != -1 else chunk)
    if not isinstance(first, dict) or not all(
            isinstance(v, (int, float)) or v is None for v in first.values()):
        raise ValueError("not a flat record of numbers")  # strings could hold commas
    keys = list(first)
    wanted = [k for k in keys if k in STEP_FIELDS]
    names = ["open"] + [name for k in keys for name in (f"key {k}", k)] + ["close"]
    key_columns = {f"key {k}": "category" for k in wanted}
    # "null" (a non-finite value, docs/logs.md) is one of pandas' default NA strings -> NaN.
    frame = pd.read_csv(io.BytesIO(chunk.translate(_JSON_TO_CSV)), header=None, names=names,
                        usecols=wanted + list(key_columns), dtype=key_columns)
    # Each key column must hold its own key on every line; this catches a line with other keys,
    # missing keys or another order (a line with too many fields already raised ParserError).
    for k in wanted:
        column = frame.pop(f"key {k}")
        if column.hasnans or list(column.cat.categories) != [k]:
            raise ValueError(f"key {k!r} is not in the same place on every line")
        if not pd.api.types.is_numeric_dtype(frame[k]):
            raise ValueError(f"{k!r} holds something other than numbers")
    return frame[wanted]


def _parse_steps_by_line(chunk: bytes) -> pd.DataFrame:
    """The slow path: ``json.loads`` per line, skipping lines that do not parse."""
    records = []
    for line in chunk.splitlines():
        record = fmt.loads(line)
        if isinstance(record, dict) and "step" in record and fmt.EVENT_KEY not in record:
            records.append({k: record[k] for k in STEP_FIELDS if k in record})
    frame = pd.DataFrame.from_records(records)
    return frame.apply(pd.to_numeric, errors="coerce")  # null -> NaN, stray strings -> NaN


def later_wins(steps: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Keep the last record of each step (file order), sorted by step; also the number dropped.

    After a resume the steps between the checkpoint and the kill are logged again. The rerun's
    values are the ones the final weights descend from, so they replace the earlier ones.
    """
    if "step" not in steps:
        return steps, 0
    steps = steps.dropna(subset=["step"])
    kept = steps.drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    kept = kept.astype({"step": "int64"}).reset_index(drop=True)
    if "epoch" in kept and not kept["epoch"].hasnans:
        kept["epoch"] = kept["epoch"].astype("int64")
    return kept, len(steps) - len(kept)


def read_evals(path: str) -> list[dict]:
    """The records of an eval.jsonl: the last one per ``(split, step)``, sorted by step."""
    latest: dict = {}
    with open(path, "rb") as f:
        for line in f:
            record = fmt.loads(line)
            if isinstance(record, dict) and "split" in record and "step" in record:
                latest[(record["split"], record["step"])] = record
    return sorted(latest.values(), key=lambda record: record["step"])


# ----------------------------------------------------------------------------- train.log

def _parse_text_log(data: bytes) -> Run:
    """A Run from train.log lines (or a Slurm log of ``log.progress: plain``).

    Only every ``log.interval``-th step is in such a log, with rounded values; the numbers are
    what the lines say. Times are the local-time stamps, so only differences are meaningful.
    """
    steps, evals, starts, resumes, events, warnings, stamps = [], [], [], [], [], [], []
    for line in data.decode("utf-8", errors="replace").splitlines():
        parsed = fmt.parse_line(line)
        if parsed is None:
            continue
        kind, stamp, fields = parsed
        stamps.append(stamp)
        if kind == "step":
            fields.pop("total")
            steps.append({"stamp": stamp, **fields})
        elif kind == "eval":
            evals.append({"stamp": stamp, **fields})
        elif kind == fmt.RESUME:
            resumes.append(fields["step"])
        elif kind == fmt.START:
            starts.append(fields)
            events.append({fmt.EVENT_KEY: fmt.START})
        elif kind == "stop":
            events.append(fields)  # an "end" or "preempted" event with its reason
        elif kind == fmt.WARNING:
            warnings.append({fmt.EVENT_KEY: fmt.WARNING, **fields})
    steps_frame, replaced = later_wins(_with_unix_time(pd.DataFrame(steps)))
    eval_records = _with_unix_time(pd.DataFrame(evals)).to_dict("records")
    latest = {(r["split"], r["step"]): r for r in eval_records}  # later wins here too
    times = _with_unix_time(pd.DataFrame({"stamp": stamps}))["time"]
    end, preempted = _last_launch_outcome(events)
    return Run(name="", source="", steps=steps_frame, replaced=replaced, starts=starts,
               resumes=resumes, end=end, preempted=preempted, warnings=warnings,
               evals=sorted(latest.values(), key=lambda r: r["step"]),
               text_wall_s=float(times.max() - times.min()) if stamps else None)


def _with_unix_time(frame: pd.DataFrame) -> pd.DataFrame:
    """Replace the ``stamp`` column by ``time`` in seconds (naive local time)."""
    if "stamp" not in frame:
        return frame
    stamps = pd.to_datetime(frame.pop("stamp"), format=fmt.STAMP_FORMAT)
    frame["time"] = (stamps - pd.Timestamp(0)).dt.total_seconds()
    return frame
