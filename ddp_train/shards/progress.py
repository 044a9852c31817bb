"""Work-done reporting for ``ddp-shards pack`` (files) and ``index`` (shards): a rich bar on a
terminal, plain lines in logs."""
from __future__ import annotations

import sys
import time
from typing import Any

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn,
                           TextColumn, TimeRemainingColumn)
from rich.text import Text

PROGRESS_MODES = ("auto", "bar", "lines", "none")  # auto: a bar on a terminal, lines otherwise


class RateColumn(ProgressColumn):
    """Items per second (rich only ships a bytes-per-second column)."""

    def __init__(self, unit: str = "files") -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Any) -> Text:
        return Text(f"{task.speed or 0:.{1 if self.unit == 'shards' else 0}f} {self.unit}/s")


class FileProgress:
    """Files-done reporting: a rich bar on a terminal, otherwise a plain line every 5 s or 10%."""

    def __init__(self, total: int, mode: str = "auto", unit: str = "files",
                 verb: str = "packed"):
        self.mode = ("bar" if sys.stdout.isatty() else "lines") if mode == "auto" else mode
        self.total, self.done = total, 0
        self.unit, self.verb = unit, verb
        self.start = self.last = time.monotonic()
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            RateColumn(unit), TimeRemainingColumn()) if self.mode == "bar" else None

    def __enter__(self) -> "FileProgress":
        if self.bar:
            self.bar.start()
            self.task = self.bar.add_task(self.verb.removesuffix("ed") + "ing",
                                          total=self.total)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar:
            self.bar.stop()

    def advance(self) -> None:
        """Count one item done."""
        self.done += 1
        if self.bar:
            self.bar.advance(self.task)
            return
        now = time.monotonic()
        step = max(1, self.total // 10)
        if self.mode == "lines" and (now - self.last >= 5 or self.done % step == 0
                                     or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.verb} {self.done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, "
                  f"ETA {eta:.0f} s)", flush=True)
