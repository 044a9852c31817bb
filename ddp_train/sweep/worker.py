"""A sweep worker: take a trial from the study, run it as a complete ddp-train run, tell the
study how it ended, repeat until the budget is spent.

Each trial runs in its own process tree (``python -m ddp_train`` for one rank, ``torchrun`` for
several) in ``<sweep>/trials/<number>/``, with its resolved config in ``trial.yaml`` there, so
a trial is exactly the run a user would get from ``ddp-train --config trial.yaml``. While it
runs, the worker beats the trial's heartbeat in the storage. A stop signal to the worker is
passed to the trial, which checkpoints; the trial is then left RUNNING and marked preempted,
and the next worker to ask (this one requeued, or any other) resumes it with the same number.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

from .. import logformat as fmt
from ..config import dump_yaml, load_config
from .spec import Sweep
from .study import STEPS, Job, SweepStudy, worker_identity

TRIAL_CONFIG = "trial.yaml"  # a trial's resolved config, in its run folder
TRIAL_LOG = "worker.log"  # the trial processes' stdout and stderr, appended per launch
STOP_EXIT = {128 + signal.SIGTERM, 128 + signal.SIGUSR1, 128 + signal.SIGINT}  # checkpointed
EXIT_REASONS = {2: "configuration error", 3: "diverged (non-finite steps)",
                124: "hung (watchdog)"}


def _die_with_parent() -> None:
    # Linux: the trial gets SIGTERM (checkpoint and stop) if its worker dies, even by SIGKILL,
    # instead of training on unsupervised while a retry of it starts.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def trial_dir(folder: str, number: int) -> str:
    """The run folder of trial ``number``."""
    return os.path.join(folder, "trials", str(number))


def write_trial_config(sweep: Sweep, study: SweepStudy, job: Job, run_dir: str) -> str:
    """Resolve and write the trial's config (its parameters, run folder and study link)."""
    cfg = sweep.trial_config(job.params, [
        f"run.path={os.path.abspath(run_dir)}", f"sweep.storage={study.storage_url}",
        f"sweep.study={sweep.name}", f"sweep.trial={job.number}"])
    path = os.path.join(run_dir, TRIAL_CONFIG)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(dump_yaml(cfg))
    os.replace(tmp, path)
    return path


def trial_command(config: str, ranks: int, resume: bool) -> list[str]:
    """The command line that runs a trial with ``ranks`` processes."""
    launch = [sys.executable, "-m", "ddp_train"]
    if ranks > 1:  # --standalone: a free port per trial, so parallel trials never collide
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                  f"--nproc_per_node={ranks}", "-m", "ddp_train"]
    return [*launch, "--config", config, *(["--resume", "auto"] if resume else [])]


def _last_error(log: str) -> str:
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 20000))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    errors = [ln for ln in lines if "error:" in ln.lower()]
    return (errors or [ln for ln in lines if ln.strip()] or [""])[-1].strip()[-300:]


def trained_steps(run_dir: str) -> Optional[int]:
    """The optimizer step the trial's last launch ended at (its metrics.jsonl), if known."""
    steps = None
    try:
        with open(os.path.join(run_dir, fmt.METRICS), "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - 65536))  # the end record is near the end
            for line in f.read().splitlines():
                if fmt.EVENT_MARK in line:
                    try:
                        record = fmt.loads(line)
                    except ValueError:  # a torn first line of the window
                        continue
                    steps = record.get("step", steps)
    except OSError:
        return None
    return steps


class Worker:
    """Runs trials one after another until the study's budget is spent or it is stopped."""

    def __init__(self, sweep: Sweep, study: SweepStudy, *, stop: threading.Event, index: int = 0,
                 gpus: Optional[str] = None) -> None:
        self.sweep, self.study, self.stop = sweep, study, stop
        self.index, self.gpus = index, gpus
        self.identity = worker_identity(index)
        self.preempted = False  # the last trial was stopped by a signal and left to resume

    def run(self) -> None:
        """Take and run trials until none is left or a stop was asked for."""
        while not self.stop.is_set():
            job = self.study.next_job(self.identity)
            if job is None:
                return
            self.run_trial(job)

    def _log(self, text: str) -> None:
        tag = f"[worker {self.index}] " if self.index else ""
        print(f"ddp-train sweep: {tag}{text}", flush=True)

    def run_trial(self, job: Job) -> str:
        """Run ``job`` to its end (or to a checkpoint when stopped); returns its state."""
        run_dir = trial_dir(self.study.folder, job.number)
        os.makedirs(run_dir, exist_ok=True)
        config = os.path.join(run_dir, TRIAL_CONFIG)
        if not (job.resume and os.path.exists(config)):  # a resumed trial keeps its own config
            config = write_trial_config(self.sweep, self.study, job, run_dir)
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in job.params.items())
        self._log(f"trial {job.number} {'resumes' if job.resume else 'starts'}: {params} "
                  f"({run_dir})")
        env = dict(os.environ)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
        log = os.path.join(run_dir, TRIAL_LOG)
        t0 = time.monotonic()
        with open(log, "ab") as out:
            out.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} trial {job.number} "
                      f"{'resumed' if job.resume else 'started'} by {self.identity}\n".encode())
            out.flush()
            proc = subprocess.Popen(trial_command(config, self.sweep.cfg.ranks, job.resume),
                                    stdout=out, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=_die_with_parent)
            rc = self._supervise(proc, job)
        return self._conclude(job, rc, log, time.monotonic() - t0)

    def _supervise(self, proc: subprocess.Popen, job: Job) -> int:
        """Wait for the trial; beat its heartbeat; pass a stop on to it (once)."""
        last_beat, forwarded = time.monotonic(), False
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
            if self.stop.is_set() and not forwarded:
                # torchrun passes SIGTERM to its ranks; each checkpoints and exits 143.
                proc.send_signal(signal.SIGTERM)
                forwarded = True
            if time.monotonic() - last_beat >= self.sweep.cfg.heartbeat_s:
                try:
                    self.study.beat(job.trial_id)
                except Exception as e:  # noqa: BLE001 - a storage hiccup; the next beat retries
                    self._log(f"trial {job.number}: heartbeat not written: {e}")
                last_beat = time.monotonic()

    def _conclude(self, job: Job, rc: int, log: str, seconds: float) -> str:
        """Tell the study how the trial ended; returns its state."""
        self.preempted = False
        frozen = self.study.storage.get_trial(job.trial_id)
        if frozen.state.is_finished():  # declared lost while it ran (no heartbeat got through)
            self._log(f"trial {job.number} ended (exit {rc}) after it was declared lost "
                      f"({frozen.user_attrs.get('lost', '?')}); its retry stands instead")
            return frozen.state.name
        steps = trained_steps(trial_dir(self.study.folder, job.number))
        if steps is not None:
            self.study.storage.set_trial_user_attr(job.trial_id, STEPS, steps)
        if rc == 0:
            state, value, note = self.study.complete(job)
        elif rc in STOP_EXIT or (self.stop.is_set() and rc != 0):
            # Stopped by a signal: checkpointed (exit 128+N), or killed while stopping; either
            # way the next launch resumes from the newest loadable checkpoint it finds.
            self.study.preempted(job)
            self.preempted = True
            self._log(f"trial {job.number} checkpointed and stopped (exit {rc}); the next "
                      "worker resumes it")
            return "PREEMPTED"
        else:
            why = EXIT_REASONS.get(rc, f"exited with status {rc}")
            detail = _last_error(log)
            state, value, note = self.study.fail(job, f"{why}: {detail}" if detail else why)
        shown = "" if value is None else f" {self.sweep.metric} {value:.4g}"
        self._log(f"trial {job.number} {state}{shown} after {seconds:.0f} s"
                  + (f" ({note})" if note else ""))
        return state


def install_stop(stop: threading.Event) -> dict:
    """SIGTERM/SIGUSR1/SIGINT set ``stop`` (workers pass it to their trials); returns what to
    restore. The first signal's number is kept in ``install_stop.received``."""
    previous = {}

    def handle(signum: int, frame: object) -> None:
        if not stop.is_set():
            print(f"ddp-train sweep: got {signal.Signals(signum).name}: stopping the running "
                  "trials at their next step (they checkpoint and resume later)", flush=True)
            handle.received = signum
        stop.set()

    handle.received = 0
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    previous["handler"] = handle
    return previous


def uninstall_stop(previous: dict) -> int:
    """Put the previous handlers back; the signal that stopped the sweep (0 = none)."""
    handler = previous.pop("handler")
    for sig, old in previous.items():
        signal.signal(sig, old)
    return handler.received


def best_config(folder: str, number: int) -> str:
    """best.yaml text: trial ``number``'s resolved config, unlinked from the sweep, with no run
    folder of its own (a retrain makes a new one)."""
    cfg = load_config(os.path.join(trial_dir(folder, number), TRIAL_CONFIG),
                      ["sweep.storage=''", "sweep.study=''", "sweep.trial=-1", "run.path=''",
                       "run.resume=''"])
    return dump_yaml(cfg)
