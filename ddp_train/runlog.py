"""The run folder and the loggers that write into it (format: docs/logs.md, ddp_train/logformat.py).

Only global rank 0 writes. :func:`make_logger` hands every other rank a :class:`NullLogger`, so the
training loop calls ``log.log_step(...)`` unconditionally. Every log file is opened in append mode
and flushed after each line: a resumed run adds to the same files, and a killed job loses at most
the line being written. Every line and record is rendered by :mod:`ddp_train.logformat`, the
module the plot reader parses them with.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import sys
import time
from typing import Any, Optional

import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from . import logformat as fmt
from .config import LogConfig, RunConfig
from .dist import DistInfo, broadcast_object

# Any of these in a folder means a run already lives there.
RUN_FILES = ("config.yaml", fmt.TRAIN_LOG, fmt.METRICS, fmt.EVALS, "checkpoints")


# ----------------------------------------------------------------------------- run folder

def create_run_dir(cfg: RunConfig, dist: DistInfo) -> str:
    """Pick (and create) this run's folder on rank 0 and return the same path on every rank.

    * ``run.path`` set: that folder exactly; refused if it already holds a run and
      ``run.resume`` is ''.
    * ``run.resume: auto``: the newest ``<run.dir>/<run.name>-<stamp>`` with a ``checkpoints/``
      folder, else a new run.
    * otherwise (new run, or resume from an explicit .pt path): a new
      ``<run.dir>/<run.name>-<YYYYmmdd-HHMMSS>`` folder, never an existing one.
    """
    path, error = None, None
    if dist.is_main:
        try:
            path = _choose_run_dir(cfg)
        except ValueError as e:
            error = str(e)
        except OSError as e:
            error = f"cannot create the run folder: {e}"
    # The error travels with the path so the other ranks fail too instead of waiting forever.
    path, error = broadcast_object(dist, (path, error))
    if error:
        raise ValueError(error)
    return path


def _choose_run_dir(cfg: RunConfig) -> str:
    if cfg.path:
        if _holds_run(cfg.path) and not cfg.resume:
            raise ValueError(f"run folder {cfg.path} already holds a run; pass --resume auto to "
                             "continue it, or choose another run.path")
        os.makedirs(cfg.path, exist_ok=True)
        return cfg.path
    if not cfg.name:  # Config fills it in from data.shards; a bare RunConfig must name itself
        raise ValueError("run.name is empty: set it, or run.path")
    if cfg.resume == "auto":
        latest = latest_run_dir(cfg.dir, cfg.name)
        if latest:
            return latest
    return _new_run_dir(cfg.dir, cfg.name)


def _holds_run(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in RUN_FILES)


def _new_run_dir(parent: str, name: str) -> str:
    """Create ``<parent>/<name>-<stamp>``, or ``-2``, ``-3``... when launches share a second."""
    os.makedirs(parent, exist_ok=True)
    base = os.path.join(parent, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    for n in range(1, 100):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)  # atomic: two launches can never both get the same folder
            return path
        except FileExistsError:
            continue
    raise ValueError(f"could not create a new run folder next to {base} (99 already exist)")


def latest_run_dir(parent: str, name: str) -> Optional[str]:
    """The newest ``<parent>/<name>-<stamp>[-n]`` folder that has ``checkpoints/``, or None.

    "Newest" is by the timestamp in the folder name (not mtime, which a resume changes).
    """
    pattern = re.compile(re.escape(name) + r"-(\d{8}-\d{6})(?:-(\d+))?")
    found = []
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        m = pattern.fullmatch(entry)
        if m and os.path.isdir(os.path.join(parent, entry, "checkpoints")):
            found.append(((m.group(1), int(m.group(2) or 1)), entry))
    return os.path.join(parent, max(found)[1]) if found else None


def write_config(run_dir: str, config: dict, dist: DistInfo) -> str:
    """Write the resolved config to ``<run>/config.yaml`` (main rank only); return the path.

    On a resume whose config changed, the previous file is kept as ``config-<n>.yaml``.
    """
    path = os.path.join(run_dir, "config.yaml")
    if not dist.is_main:
        return path
    text = yaml.safe_dump(config, sort_keys=False)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path
        os.replace(path, _first_free(os.path.join(run_dir, "config-{}.yaml")))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _first_free(template: str) -> str:
    n = 1
    while os.path.exists(template.format(n)):
        n += 1
    return template.format(n)


def problems_path(run_dir: str) -> str:
    """Where the data loader appends unreadable samples: ``<run>/problematic_samples.jsonl``."""
    return os.path.join(run_dir, "problematic_samples.jsonl")


# ----------------------------------------------------------------------------- JSON lines

class JsonlFile:
    """An append-only JSON-lines file, flushed after every record."""

    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")
        # A job killed mid-write can leave a torn last line; start on a fresh line so our first
        # record is not glued onto it (readers skip the one unparsable line).
        if self.file.tell() > 0 and not _ends_with_newline(path):
            self.file.write("\n")

    def write(self, record: dict) -> None:
        """Append one record as one line and flush it to the OS."""
        self.file.write(fmt.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


# ----------------------------------------------------------------------------- optional sinks

def _scalars(record: dict, skip: tuple[str, ...]) -> dict[str, float]:
    """The plain numeric fields of a record (bools, strings, lists and ``skip`` left out)."""
    return {k: v for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in skip}


class TensorBoardSink:
    """Scalars to ``<run>/tb``: ``train/<field>`` per step, ``<split>/<field>`` per eval."""

    def __init__(self, run_dir: str, resumed_from_step: Optional[int]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError("log.tensorboard needs tensorboard: "
                              "pip install ddp-train[tensorboard]") from e
        # purge_step makes TensorBoard drop the old run's points past the resume step, the same
        # "later values win" rule that readers of metrics.jsonl follow.
        self.writer = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=resumed_from_step)

    def log_step(self, record: dict) -> None:
        for key, value in _scalars(record, ("step", "time")).items():
            self.writer.add_scalar(f"train/{key}", value, record["step"], walltime=record["time"])

    def log_eval(self, record: dict) -> None:
        for key, value in _scalars(record, ("step", "time")).items():
            self.writer.add_scalar(f"{record['split']}/{key}", value, record["step"],
                                   walltime=record["time"])

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases in offline mode under ``<run>/wandb`` (sync later with ``wandb sync``)."""

    def __init__(self, run_dir: str, project: str, config: Optional[dict]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ImportError("log.wandb needs wandb: pip install ddp-train[wandb]") from e
        name = os.path.basename(os.path.normpath(run_dir))
        # The folder name doubles as the run id, so a resumed job continues the same W&B run.
        self.run = wandb.init(project=project, name=name, id=name, resume="allow", dir=run_dir,
                              mode="offline", config=config)
        # "step" is our x-axis rather than W&B's own counter, which rejects the repeated steps
        # that follow a resume.
        self.run.define_metric("*", step_metric="step")

    def log_step(self, record: dict) -> None:
        scalars = _scalars(record, ("step", "time"))
        self.run.log({"step": record["step"], **{f"train/{k}": v for k, v in scalars.items()}})

    def log_eval(self, record: dict) -> None:
        scalars = _scalars(record, ("step", "time"))
        split = record["split"]
        self.run.log({"step": record["step"], **{f"{split}/{k}": v for k, v in scalars.items()}})

    def close(self) -> None:
        self.run.finish()


# ----------------------------------------------------------------------------- loggers

class Logger:
    """The logging interface. Every method is a no-op here; :class:`RunLogger` does the work."""

    def info(self, msg: str) -> None:
        """A human-readable line for train.log and the console."""

    def log_step(self, record: dict) -> None:
        """One optimizer step's numbers (fields in docs/logs.md)."""

    def log_eval(self, record: dict) -> None:
        """One evaluation's results (fields in docs/logs.md)."""

    def event(self, name: str, **fields: Any) -> None:
        """A lifecycle record such as start, resume or end (names in :mod:`.logformat`)."""

    def warning(self, msg: str, event: str = fmt.WARNING, **fields: Any) -> None:
        """Something went wrong but training goes on: a ``WARNING:`` line and an event."""

    def close(self) -> None:
        """Flush and close everything."""

    def __enter__(self) -> "Logger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullLogger(Logger):
    """What ranks other than 0 get: accepts every call and writes nothing."""


class RunLogger(Logger):
    """Rank 0's logger: train.log, metrics.jsonl, eval.jsonl, the console, and optional sinks."""

    def __init__(self, cfg: LogConfig, run_dir: str, *, total_steps: int, start_step: int = 0,
                 sinks: tuple = ()) -> None:
        self.cfg, self.total_steps, self.start_step = cfg, total_steps, start_step
        self.sinks = list(sinks)
        self.text = open(os.path.join(run_dir, fmt.TRAIN_LOG), "a", encoding="utf-8")
        self.metrics = JsonlFile(os.path.join(run_dir, fmt.METRICS))
        self.evals = JsonlFile(os.path.join(run_dir, fmt.EVALS))
        # soft_wrap keeps long lines whole in Slurm logs; markup off: "[...]" in a message is text.
        self.console = Console(soft_wrap=True, highlight=False, markup=False)
        self.mode = cfg.progress
        if self.mode == "auto":
            self.mode = "rich" if sys.stdout.isatty() else "plain"
        self.progress: Optional[Progress] = None  # started at the first step
        self.t0 = time.monotonic()  # the ETA averages over this process's steps only

    def info(self, msg: str) -> None:
        """Timestamped line to train.log (flushed) and to the console."""
        line = fmt.stamp(msg)
        self._write_text(line)
        self.console.print(line)  # printed above the progress bar while it is live

    def log_step(self, record: dict) -> None:
        """Append the step to metrics.jsonl (adding ``time``), feed the sinks and the console."""
        record = {**fmt.plain(record), "time": time.time()}
        self.metrics.write(record)
        for sink in self.sinks:
            sink.log_step(record)
        step = record["step"]
        if self.mode == "rich":
            self._advance_bar(record)
        if step % self.cfg.interval == 0 or step == self.total_steps:
            line = fmt.stamp(fmt.render_step(record, self.total_steps, self._eta(step)))
            self._write_text(line)  # train.log gets the line whatever the console shows
            if self.mode == "plain":
                self.console.print(line)

    def log_eval(self, record: dict) -> None:
        """Append the eval to eval.jsonl (adding ``time``), feed the sinks, and info() a summary."""
        record = {**fmt.plain(record), "time": time.time()}
        self.evals.write(record)
        for sink in self.sinks:
            sink.log_eval(record)
        self.info(fmt.render_eval(record))

    def event(self, name: str, **fields: Any) -> None:
        """Append ``{"event": name, **fields, "time": ...}`` to metrics.jsonl, and info() the
        event's line for the kinds that have one (:func:`.logformat.event_line`).

        ``start`` with run_dir, model, world_size, batch_size, grad_accum, updates_per_epoch
        and total_steps -> the ``run ...`` line; ``resume`` with step and path -> ``resumed
        from <path> at step <N>``; ``end`` / ``preempted`` with reason -> ``stopped: <reason>``.
        An event without those fields, and every other event, is only a JSON record.
        """
        fields = fmt.plain(fields)
        self.metrics.write({fmt.EVENT_KEY: name, **fields, "time": time.time()})
        line = fmt.event_line(name, fields)
        if line is not None:
            self.info(line)

    def warning(self, msg: str, event: str = fmt.WARNING, **fields: Any) -> None:
        """info() ``WARNING: <msg>`` and append ``{"event": event, "message": msg, **fields}``."""
        self.info(fmt.render_warning(msg))
        self.metrics.write({fmt.EVENT_KEY: event, "message": msg, **fmt.plain(fields),
                            "time": time.time()})

    def close(self) -> None:
        """Stop the bar, close the sinks and the files. Safe to call twice."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        for f in (self.metrics, self.evals, self.text):
            f.close()

    def _write_text(self, line: str) -> None:
        self.text.write(line + "\n")
        self.text.flush()

    def _eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0:
            return "?"
        seconds = (time.monotonic() - self.t0) / done * max(self.total_steps - step, 0)
        return str(datetime.timedelta(seconds=round(seconds)))

    def _advance_bar(self, record: dict) -> None:
        fields = dict(loss=record.get("loss", math.nan), lr=record.get("lr", math.nan),
                      ips=record.get("samples_per_s", math.nan))
        if self.progress is None:
            self.progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  "
                           "{task.fields[ips]:.0f} img/s"),
                TextColumn("eta"), TimeRemainingColumn(), console=self.console)
            self.progress.start()
            # Starting at the resume step keeps the jump out of rich's speed (and ETA) estimate.
            self.task = self.progress.add_task("train", total=self.total_steps,
                                               completed=self.start_step, **fields)
        self.progress.update(self.task, completed=record["step"], **fields)


def make_logger(cfg: LogConfig, run_dir: str, dist: DistInfo, *, total_steps: int,
                resumed_from_step: Optional[int] = None, resumed_from_path: str = "",
                wandb_project: str = "ddp-train", config: Optional[dict] = None) -> Logger:
    """The logger for this rank: a :class:`RunLogger` on rank 0, a :class:`NullLogger` elsewhere.

    ``resumed_from_step`` (when resuming) makes TensorBoard drop the old points past it and is
    written as a ``resume`` event; with ``resumed_from_path`` (the checkpoint) that event also
    writes the ``resumed from <path> at step <N>`` line. ``wandb_project`` and ``config`` (the
    resolved config dict) only matter with ``log.wandb``.
    """
    if not dist.is_main:
        return NullLogger()
    sinks = []
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir, resumed_from_step))
    if cfg.wandb:
        sinks.append(WandbSink(run_dir, wandb_project, config))
    logger = RunLogger(cfg, run_dir, total_steps=total_steps, start_step=resumed_from_step or 0,
                       sinks=tuple(sinks))
    if resumed_from_step is not None:
        # Without a path the event gets no text line: callers that still write that line
        # themselves (with info) do not get it twice.
        path = {"path": resumed_from_path} if resumed_from_path else {}
        logger.event(fmt.RESUME, step=resumed_from_step, **path)
    return logger
