"""What carries a multi-day run through preemption, hangs and divergence.

* :class:`StopSignals`: SIGUSR1 (Slurm's warning before a time limit or preemption), SIGTERM
  (``scancel``, ``scontrol requeue``, torchrun shutting its workers down) and SIGINT (Ctrl-C) set
  a flag; the loop finishes the current optimizer step, writes ``last`` and exits 128+signum.
* :func:`agree`: the ranks' once-per-step vote (stop? checkpoint due?) so they all act on the
  same step, even when a signal reaches them a few milliseconds apart.
* :class:`NonFiniteGuard`: counts consecutive optimizer steps whose gradient was not finite.
* :class:`Watchdog`: a thread that dumps every thread's stack to the run folder and exits the
  process when no step (or eval batch) completes within ``watchdog.timeout`` seconds.

None of this exists in torch, timm or DeepSpeed in a form that fits a training loop without a
callback system, so it is written here by hand.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as tdist

from .dist import DistInfo

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
WATCHDOG_EXIT_CODE = 124  # what `timeout(1)` returns for a command that ran out of time


class StopSignals:
    """Turns stop signals into a flag the training loop polls between optimizer steps.

    Handlers are installed in the main thread only (Python's rule) and restored by
    :meth:`restore`. A second Ctrl-C raises KeyboardInterrupt at once, for a user who does not
    want to wait for the step and the checkpoint.
    """

    def __init__(self) -> None:
        self.received: int = 0  # first stop signal's number, 0 while none arrived
        self._previous: dict[int, Any] = {}

    def install(self) -> "StopSignals":
        """Install the handlers (no-op outside the main thread); returns self."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            # On demand: `kill -USR2 <pid>` prints every thread's stack, the job keeps running.
            # faulthandler needs a real file descriptor: the process's own stderr, not a
            # replacement object (pytest's capture, a notebook).
            faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = self.received or signum

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if threading.current_thread() is threading.main_thread():
            faulthandler.unregister(signal.SIGUSR2)

    @property
    def name(self) -> str:
        """Name of the received signal ("SIGTERM"), or "" when none arrived."""
        return signal.Signals(self.received).name if self.received else ""


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave stop signals to their rank's main process.

    Ctrl-C and Slurm's ``scancel`` signal every process of the job; a worker that died of it
    would make the next batch fetch fail before the rank could write its checkpoint. The main
    process shuts its workers down itself once it is done.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def agree(dist: DistInfo, flags: list[int]) -> list[int]:
    """Element-wise max of ``flags`` over all ranks (the flags themselves in one process).

    One tiny all-reduce per optimizer step. It runs right after the step's ``loss.item()``
    has synchronised with the device anyway, so it adds no extra stall on a GPU.
    """
    if not dist.distributed:
        return list(flags)
    t = torch.tensor(flags, dtype=torch.int64, device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


class NonFiniteGuard:
    """Counts consecutive optimizer steps with a non-finite gradient norm.

    The engine skips such a step (the weights and optimizer state stay as they were), so the
    weights at the end of a streak are the ones from before it began. The gradient norm is
    taken after DDP's all-reduce, so every rank sees the same value and makes the same
    decision without a collective of its own.
    """

    def __init__(self, patience: int) -> None:
        """``patience``: stop after this many consecutive non-finite steps (0 = never stop)."""
        self.patience = patience
        self.streak = 0
        self.first_bad_step = 0  # first step of the current streak

    def update(self, step: int, finite: bool) -> bool:
        """Record one optimizer step; True when the run should stop."""
        if finite:
            self.streak = 0
            return False
        if self.streak == 0:
            self.first_bad_step = step
        self.streak += 1
        return bool(self.patience) and self.streak >= self.patience

    def state_dict(self) -> dict[str, int]:
        """Streak state, so a resume inside a streak keeps counting."""
        return {"streak": self.streak, "first_bad_step": self.first_bad_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`."""
        self.streak, self.first_bad_step = int(state["streak"]), int(state["first_bad_step"])


class Watchdog:
    """Kills a hung rank so the launcher (torchrun ``--max-restarts``, Slurm) can restart it.

    Call :meth:`beat` whenever progress is made. If ``timeout_s`` passes without a beat, the
    watchdog thread writes ``hang-rank<R>-<unix time>.txt`` (every thread's Python stack: the
    main thread's shows where it hangs, e.g. inside an all-reduce waiting for a dead peer) and
    ends the process with exit code 124. ``timeout_s`` 0 disables it.
    """

    def __init__(self, timeout_s: float, dump_dir: str, rank: int) -> None:
        self.timeout_s = timeout_s
        self.dump_dir = dump_dir
        self.rank = rank
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Watchdog":
        """Start watching (a daemon thread); returns self."""
        if self.timeout_s > 0 and self._thread is None:
            self.beat()
            self._thread = threading.Thread(target=self._run, name="ddp-train-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def beat(self) -> None:
        """Progress was made: restart the countdown. Cheap enough to call per batch."""
        self._last = time.monotonic()  # a float store is atomic under the GIL: no lock needed

    def watch(self, items: Iterable) -> Iterator:
        """Yield from ``items``, beating once per item (wraps eval loaders)."""
        for item in items:
            self.beat()
            yield item

    def stop(self) -> None:
        """Stop the thread (at the end of the run, or before a long phase it must not judge)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._stop.clear()

    def _run(self) -> None:
        poll = min(5.0, self.timeout_s / 4)
        while not self._stop.wait(poll):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        path = os.path.join(self.dump_dir, f"hang-rank{self.rank}-{int(time.time())}.txt")
        message = (f"ddp-train watchdog: rank {self.rank}: no step completed for {idle:.0f} s "
                   f"(watchdog.timeout={self.timeout_s:g}); stacks in {path}; exiting with "
                   f"code {WATCHDOG_EXIT_CODE} so the launcher can restart the job")
        try:
            os.makedirs(self.dump_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(message + "\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            print(f"ddp-train watchdog: cannot write {path}: {e}", file=sys.stderr)
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
        print(message, file=sys.stderr, flush=True)
        # os._exit, not sys.exit: the main thread is stuck (that is the point), so an exception
        # raised here would never reach it, and atexit handlers could block on the same lock.
        os._exit(WATCHDOG_EXIT_CODE)
