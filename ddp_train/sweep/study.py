"""The Optuna study behind a sweep: storage, sampler, pruner, and which trial runs next.

Every process of a sweep (workers on one node, Slurm array tasks on many, and rank 0 of each
running trial) opens the same study. What Optuna does not do is written here by hand: counting
the budget so that failed-and-retried trials give theirs back, taking over a preempted trial
(same number, same parameters, its reported values kept), and noticing a trial whose worker
died (heartbeat). Those decisions are taken under one lock file in the sweep folder
(:class:`optuna.storages.journal.JournalFileOpenLock`: an ``O_EXCL`` file, safe on NFS), so two
workers never take the same trial and the budget is never overshot.
"""
from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import TrialState

from ..config import ConfigError
from .spec import PrunerConfig, SamplerConfig, Sweep

JOURNAL = "study.journal"  # the default storage, in the sweep folder
# Trial user attributes this module reads and writes.
WORKER = "worker"  # {"host", "pid", "id"} of the worker running it
HEARTBEAT = "heartbeat"  # unix time of the worker's last sign of life
PREEMPTED = "preempted"  # set by a worker that stopped on a signal: resume this trial
LOST = "lost"  # why a trial's worker was declared dead; such a FAIL gives its budget back
RETRY_OF = "retry_of"  # number of the lost trial whose parameters this one runs again
PRUNED = "pruned"  # the pruner's reason, written by the trial's rank 0
ATTEMPTS = "attempts"  # launches of this trial (1 + resumes)
STEPS = "steps"  # optimizer steps the trial's run ended at

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own lines say what happens


def open_storage(url: str) -> Any:
    """A journal file path (``*.journal`` or any path) or an SQLAlchemy URL -> Optuna storage."""
    if "://" in url:
        # No Optuna heartbeat: it exists only for RDB storages; ours (below) works on both.
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    # The O_EXCL lock works on local disks and NFSv3+, so workers on several nodes may share it.
    return JournalStorage(JournalFileBackend(url, lock_obj=JournalFileOpenLock(url)))


def display_url(url: str) -> str:
    """``url`` with any password masked, for logs and the report."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def build_sampler(cfg: SamplerConfig, sweep: Sweep) -> optuna.samplers.BaseSampler:
    """The sampler of ``sampler.name`` (seeded)."""
    if cfg.name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if cfg.name == "grid":
        return optuna.samplers.GridSampler({p.key: p.grid() for p in sweep.space}, seed=cfg.seed)
    # constant_liar: parallel workers do not all pick the point next to the running trials'.
    return optuna.samplers.TPESampler(seed=cfg.seed, multivariate=cfg.multivariate,
                                      n_startup_trials=cfg.n_startup_trials, constant_liar=True)


def build_pruner(cfg: PrunerConfig | dict) -> optuna.pruners.BasePruner:
    """The pruner of ``pruner.name``; a dict is a stored copy of the section."""
    if isinstance(cfg, dict):
        cfg = PrunerConfig(**cfg)
    if cfg.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.n_startup_trials,
                                           n_warmup_steps=cfg.n_warmup_steps,
                                           interval_steps=cfg.interval_steps)
    if cfg.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=cfg.min_resource,
                                              reduction_factor=cfg.reduction_factor)
    return optuna.pruners.NopPruner()


@dataclass
class Job:
    """A trial for a worker to run: a new one, or one to resume from its checkpoint."""

    number: int
    trial_id: int
    params: dict
    resume: bool  # continue its run folder (a preempted trial) instead of starting it


def worker_identity(index: int = 0) -> dict:
    """Who runs a trial: host and pid (a dead local owner is seen at once) and an id."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "id": f"{os.getpid()}.{index}"}


def _owner_dead(attrs: dict, grace_s: float, now: float) -> str:
    """Why the worker that owns a RUNNING trial is considered gone ('' = alive)."""
    owner, beat = attrs.get(WORKER) or {}, attrs.get(HEARTBEAT)
    if owner.get("host") == socket.gethostname() and owner.get("pid"):
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return f"its worker (pid {owner['pid']} on this host) is gone"
        except PermissionError:
            pass  # alive, another user's
    if beat is not None and now - float(beat) > grace_s:
        return f"no heartbeat for {now - float(beat):.0f} s (grace {grace_s:g} s)"
    return ""


class SweepStudy:
    """One process's handle on the sweep's study (see the module docstring)."""

    def __init__(self, sweep: Sweep, storage_url: str, folder: str) -> None:
        self.sweep, self.storage_url, self.folder = sweep, storage_url, folder
        self.storage = open_storage(storage_url)
        self.study = optuna.create_study(
            study_name=sweep.name, storage=self.storage, load_if_exists=True,
            sampler=build_sampler(sweep.cfg.sampler, sweep),
            pruner=build_pruner(sweep.cfg.pruner), direction=sweep.direction)
        # Decisions shared by all workers are taken under this lock (sweep.lock in the folder).
        self._lock = JournalFileOpenLock(os.path.join(folder, "sweep"), grace_period=120)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the sweep's lock (blocking; a holder dead for 120 s loses it)."""
        self._lock.acquire()
        try:
            yield
        finally:
            self._lock.release()

    def initialise(self) -> None:
        """Store the sweep's settings in the study (once) and queue its ``enqueue`` trials."""
        with self.locked():
            known = self.study.user_attrs.get("sweep")
            if known:
                if known["identity"] != self.sweep.identity():
                    raise ConfigError(f"study {self.sweep.name!r} in "
                                      f"{display_url(self.storage_url)} belongs to a different "
                                      "sweep (space, sampler, pruner or base differ): name this "
                                      "sweep differently")
                return
            for params in self.sweep.cfg.enqueue:
                self.study.enqueue_trial(params)
            self.study.set_user_attr("started", time.time())
            # Rank 0 of each trial rebuilds the pruner and reads the metric from here.
            self.study.set_user_attr("sweep", {
                "metric": self.sweep.metric, "direction": self.sweep.direction,
                "pruner": vars(self.sweep.cfg.pruner), "identity": self.sweep.identity()})

    def trials(self, *states: TrialState) -> list[optuna.trial.FrozenTrial]:
        """The study's trials (all, or those in ``states``), by number."""
        return self.study.get_trials(deepcopy=False, states=states or None)

    def used_budget(self) -> int:
        """Trials that count against ``trials``: all but the lost (retried) ones."""
        return sum(1 for t in self.trials() if LOST not in t.user_attrs)

    def time_left(self) -> bool:
        """Whether a new trial may still start under ``timeout_min``."""
        limit = self.sweep.cfg.timeout_min
        started = self.study.user_attrs.get("started", time.time())
        return not limit or time.time() - started < 60 * limit

    def finished(self) -> bool:
        """No trial is running or waiting and none may be started."""
        busy = self.trials(TrialState.RUNNING, TrialState.WAITING)
        return not busy and not self._may_ask()

    def _may_ask(self) -> bool:
        if not self.time_left():
            return False
        return not self.sweep.budget or self.used_budget() < self.sweep.budget

    def next_job(self, worker: dict) -> Optional[Job]:
        """The next trial for ``worker``: a preempted one to resume, else a queued or new one;
        None when the budget is spent. Lost trials found on the way are failed and re-queued."""
        with self.locked():
            now = time.time()
            for t in self.trials(TrialState.RUNNING):
                if t.user_attrs.get(PREEMPTED):
                    self._claim(t._trial_id, worker, t.user_attrs.get(ATTEMPTS, 1) + 1)
                    self.storage.set_trial_user_attr(t._trial_id, PREEMPTED, False)
                    return Job(t.number, t._trial_id, dict(t.params), resume=True)
                why = _owner_dead(t.user_attrs, self.sweep.cfg.grace_s, now)
                if why:
                    self.give_back(t, why)
            waiting = self.trials(TrialState.WAITING)
            if not waiting and not self._may_ask():
                return None
            trial = self.study.ask()  # a queued trial first (Optuna pops WAITING ones)
            params = {p.key: p.suggest(trial) for p in self.sweep.space}
            self._claim(trial._trial_id, worker, 1)
            return Job(trial.number, trial._trial_id, params, resume=False)

    def _claim(self, trial_id: int, worker: dict, attempts: int) -> None:
        self.storage.set_trial_user_attr(trial_id, WORKER, worker)
        self.storage.set_trial_user_attr(trial_id, ATTEMPTS, attempts)
        self.beat(trial_id)

    def beat(self, trial_id: int) -> None:
        """Mark the trial's worker alive now."""
        self.storage.set_trial_user_attr(trial_id, HEARTBEAT, time.time())

    def give_back(self, trial: optuna.trial.FrozenTrial, why: str) -> None:
        """Fail a trial whose worker is gone and queue its parameters again: its budget goes
        back (the retry counts instead)."""
        self.storage.set_trial_user_attr(trial._trial_id, LOST, why)
        self.study.tell(trial.number, state=TrialState.FAIL)
        self.study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number})
        print(f"ddp-train sweep: trial {trial.number} failed: {why}; its parameters are queued "
              "again", flush=True)

    # ------------------------------------------------------------------ results of a trial

    def complete(self, job: Job) -> tuple[str, Optional[float], str]:
        """Tell the study how a trial that exited 0 ended: (state, value, note).

        Pruned if its rank 0 said so; else complete with the best value it reported (the
        metric best.pt was chosen on), failed when it reported none."""
        frozen = self.storage.get_trial(job.trial_id)
        values = [v for v in frozen.intermediate_values.values() if v == v]  # drop NaN
        if frozen.user_attrs.get(PRUNED):
            self.study.tell(job.number, state=TrialState.PRUNED)
            last = frozen.last_step
            return ("PRUNED", None if last is None else frozen.intermediate_values[last],
                    frozen.user_attrs[PRUNED])
        if not values:
            return self.fail(job, "no val metric was reported (no val eval ran?)")
        best = max(values) if self.sweep.direction == "maximize" else min(values)
        self.study.tell(job.number, best)
        return "COMPLETE", best, ""

    def fail(self, job: Job, why: str) -> tuple[str, None, str]:
        """The trial itself failed (config error, divergence, crash): it keeps its budget."""
        self.storage.set_trial_user_attr(job.trial_id, "error", why)
        self.study.tell(job.number, state=TrialState.FAIL)
        return "FAIL", None, why

    def preempted(self, job: Job) -> None:
        """The worker stopped on a signal after the trial checkpointed: leave it RUNNING and
        let the next worker (this one requeued, or another) resume it."""
        self.storage.set_trial_user_attr(job.trial_id, PREEMPTED, True)
