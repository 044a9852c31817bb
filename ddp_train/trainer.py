"""The training loop: build everything from the config, then train/eval/checkpoint in fixed order.

:meth:`Trainer.fit` is a list of phases: start, then epochs of (train updates -> end of epoch),
then finish. Inside an epoch each micro-batch goes next batch -> forward -> backward ->
engine.step, and each optimizer update -> EMA, schedule, log, finite check, eval when due, the
ranks' stop/checkpoint vote, checkpoint when due. Single process, DDP and DeepSpeed are hidden
behind :mod:`ddp_train.engine`; rank 0 versus the rest behind the logger (a NullLogger off rank
0); what a checkpoint holds behind :mod:`ddp_train.checkpoint` (one mapping of stateful parts).
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from . import calibrate
from . import checkpoint as ckpt
from .config import Config, ConfigError, to_dict
from .data import build_loader
from .data.loader import apply_fold, extra_specs
from .dist import DistInfo
from .ema import build_ema
from .engine import build_engine
from .evaluation import Evaluator
from .guard import NonFiniteGuard, StopSignals, Watchdog, agree
from .logformat import TRIAL_REPORT_FAILED
from .losses import build_criterion, build_mixup
from .metrics import EarlyStopping
from .models import build_model
from .optim import build_optimizer, build_scheduler, current_lr
from .runlog import create_run_dir, make_logger, problems_path, write_config
from .shards.manifest import load_manifest
from .sweep.link import connect_trial


@dataclass
class Progress:
    """Where training stands. Only ``step`` is checkpointed (the entry ``step``): the epoch is
    the loader's, and the rest describes how this launch ended."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch (the loader's epoch counter)
    stop_reason: str = ""  # set when early stopping, max_steps, a signal or divergence ends it
    signal: int = 0  # the stop signal that ended this launch (0 = none)
    diverged: bool = False  # stopped on non-finite steps
    pruned: bool = False  # stopped by the sweep's pruner

    def state_dict(self) -> int:
        """The optimizer updates done."""
        return self.step

    def load_state_dict(self, step: int) -> None:
        """Continue from update ``step``."""
        self.step = int(step)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (model init must be identical on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Owns one run: its folder, model, engine, loaders, schedule, logger and checkpoints."""

    def __init__(self, cfg: Config, dist: DistInfo) -> None:
        self.cfg, self.dist = cfg, dist
        run_cfg = cfg.run
        if dist.restart_count and not run_cfg.resume:
            # torchrun --max-restarts / a Slurm requeue relaunched this command: continue the run
            # it started instead of beginning a new one.
            run_cfg = dataclasses.replace(run_cfg, resume="auto")
        try:
            self.run_dir = create_run_dir(run_cfg, dist)
        except ValueError as e:  # an existing run folder: refuse rather than overwrite it
            raise ConfigError(f"run: {e}") from None
        try:
            self.manifest = load_manifest(cfg.data.shards)
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.shards: {e}") from None
        self.manifest = apply_fold(self.manifest, cfg.data)  # data.fold=k: one CV fold's splits
        self.classes = self.manifest.classes
        try:  # specs of the extra members (multimodal inputs) the loaders will yield
            self.inputs = extra_specs(self.manifest, cfg.data.extras)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        seed_everything(cfg.seed)
        model = build_model(cfg.model, self.manifest.num_classes, cfg.multimodal, self.inputs)
        self.engine = build_engine(cfg.engine, model, build_optimizer(cfg.optim, model), dist,
                                   batch_size=cfg.train.batch_size,
                                   grad_accum=cfg.train.grad_accum, clip_grad=cfg.train.clip_grad,
                                   channels_last=cfg.train.channels_last,
                                   compile=cfg.train.compile)
        # Different dropout / drop-path draws per rank, after the shared initialisation.
        torch.manual_seed(cfg.seed * 1000 + dist.rank + 1)
        self.train_loader = self._loader(cfg.data.train_split, train=True)
        counts = self.manifest.split(cfg.data.train_split).class_counts
        self.criterion = build_criterion(cfg.loss, class_counts=counts, mixing=cfg.augment.mixing,
                                         num_classes=self.manifest.num_classes,
                                         device=self.dist.device)
        self.mixup = build_mixup(cfg.augment, cfg.loss, num_classes=self.manifest.num_classes,
                                 batch_size=cfg.train.batch_size)
        self.ema = build_ema(cfg.ema, self.engine.unwrapped, dist,
                             replicated=self.engine.replicated_weights)
        self.updates_per_epoch = len(self.train_loader) // cfg.train.grad_accum
        if self.updates_per_epoch == 0:
            raise ConfigError(f"train.grad_accum: {cfg.train.grad_accum} micro-batches exceed the "
                              f"{len(self.train_loader)} batches of an epoch")
        self.total_steps = cfg.train.epochs * self.updates_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.scheduler = build_scheduler(cfg.schedule, self.engine.optimizer,
                                         updates_per_epoch=self.updates_per_epoch,
                                         total_updates=self.total_steps,
                                         metric_mode="min" if cfg.early_stop.metric == "loss"
                                         else "max")
        self.stopper = EarlyStopping(cfg.early_stop)
        self.checkpoints = ckpt.CheckpointManager(cfg.checkpoint,
                                                  os.path.join(self.run_dir, "checkpoints"), dist,
                                                  suffix=self.engine.checkpoint_suffix,
                                                  write=self.engine.save_checkpoint)
        self.config_hash = ckpt.config_hash(to_dict(cfg))
        self.progress = Progress()
        self.temperature = calibrate.FittedTemperature()
        self.rngs = ckpt.RngStates(dist)
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.signals = StopSignals()
        self.watchdog = Watchdog(cfg.watchdog.timeout, self.run_dir, dist.rank)
        self.trial = connect_trial(cfg.sweep, dist.is_main)  # NoTrial unless a sweep started us
        self.t_start = time.time()
        self.last_save = time.monotonic()
        with warnings.catch_warnings(record=True) as skipped:  # corrupt checkpoints passed over
            warnings.simplefilter("always")
            resume_from = self.checkpoints.resume_path(run_cfg.resume)
        changed = self.restore(resume_from) if resume_from else {}
        write_config(self.run_dir, to_dict(cfg), dist)
        self.log = make_logger(cfg.log, self.run_dir, dist, total_steps=self.total_steps,
                               resumed_from_step=self.progress.step if resume_from else None,
                               resumed_from_path=resume_from or "", config=to_dict(cfg))
        for w in skipped:
            self.log.warning(str(w.message))
        if changed:
            self.log.warning(f"config changed since {resume_from}: {ckpt.describe_diff(changed)}",
                             event="config_changed", step=self.progress.step, changes=changed)
        self.evaluator = Evaluator(self.engine, self.ema, self.temperature,
                                   make_loader=self._loader, manifest=self.manifest, dist=dist,
                                   log=self.log, watchdog=self.watchdog,
                                   val_split=cfg.data.val_split, tta=cfg.tta,
                                   calibration=cfg.calibration,
                                   eval_ema=cfg.ema.eval or cfg.early_stop.use_ema,
                                   select_ema=cfg.early_stop.use_ema)

    def _loader(self, split: str, train: bool):
        batch = self.cfg.train.batch_size if train else (self.cfg.eval.batch_size
                                                          or self.cfg.train.batch_size)
        try:
            return build_loader(self.cfg.data, self.dist, split=split, train=train,
                                batch_size=batch, seed=self.cfg.seed, manifest=self.manifest,
                                problems_path=problems_path(self.run_dir),
                                augment=self.cfg.augment if train else None)
        except ValueError as e:
            raise ConfigError(f"data: {e}") from None

    # ------------------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train until epochs, max_steps, early stopping or a stop signal; then finish."""
        self.start()
        while self.progress.step < self.total_steps and not self.progress.stop_reason:
            self.train_epoch()  # optimizer updates until the epoch ends or the run must stop
            self.end_epoch()  # end-of-epoch eval and checkpoint
        return self.finish()  # calibration, test eval and the end record (unless preempted)

    def start(self) -> None:
        """Log the launch: what runs, on how many ranks, for how long."""
        cfg = self.cfg
        self.log.event("start", step=self.progress.step, run_dir=self.run_dir,
                       world_size=self.dist.world_size, model=cfg.model.name,
                       batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                       updates_per_epoch=self.updates_per_epoch, total_steps=self.total_steps,
                       train_samples=self.train_loader.num_samples, classes=self.classes,
                       shards=cfg.data.shards, engine=self.engine.name,
                       precision=cfg.engine.precision)

    def train_epoch(self) -> None:
        """Micro-batches of the current epoch from where the loader stands, until its end or
        until the run must stop."""
        cfg, p = self.cfg, self.progress
        if self.train_loader.consumed == 0:
            self.train_loader.set_epoch(p.epoch)
        # Whole accumulation windows only: a trailing partial window would mix epochs.
        epoch_micro = self.updates_per_epoch * cfg.train.grad_accum
        t_prev = t_last = time.perf_counter()  # end of the previous update / of fetching
        data_s, loss_sum = 0.0, torch.zeros((), device=self.dist.device)
        for images, targets in islice(self.train_loader,
                                      epoch_micro - self.train_loader.consumed):
            self.watchdog.beat()
            data_s += time.perf_counter() - t_last
            images = self.engine.to_device(images)
            targets = targets.to(self.dist.device, non_blocking=True)
            images, targets = self.mixup(images, targets, p.epoch)
            with self.engine.autocast():
                loss = self.criterion(self.engine.model(images), targets)
            self.engine.backward(loss)
            loss_sum += loss.detach().float()
            out = self.engine.step()
            t_last = time.perf_counter()
            if out is None:  # inside an accumulation window
                continue
            p.step += 1
            self.ema.update(self.engine.unwrapped, p.step)
            self.scheduler.step_update(p.step)
            # .item() syncs with the device once per update; the grad norm already did.
            self._log_step(loss_sum.item() / cfg.train.grad_accum, out, data_s, t_last - t_prev)
            data_s, loss_sum = 0.0, torch.zeros((), device=self.dist.device)
            self.check_finite(out)
            if cfg.eval.every_steps and p.step % cfg.eval.every_steps == 0:
                self.validate()
            # Every rank votes once per update, so all act on the same step: a stop signal that
            # reached one rank, or a wall-clock checkpoint that one rank's clock says is due.
            stop_signal, time_due = agree(self.dist, [self.signals.received,
                                                      self.wall_clock_save_due()])
            if p.step >= self.total_steps:
                p.stop_reason = p.stop_reason or f"finished {self.total_steps} updates"
            elif stop_signal and not p.stop_reason:
                p.signal = stop_signal
                p.stop_reason = f"preempted by {self.signals.name or stop_signal}"
            if p.stop_reason:
                return
            if time_due or (cfg.checkpoint.every_steps
                            and p.step % cfg.checkpoint.every_steps == 0):
                self.save(periodic=True)
            t_prev = t_last = time.perf_counter()  # eval/checkpoint time is not data wait

    def end_epoch(self) -> None:
        """Advance the epoch when it ran to its end (eval at epoch end); write last."""
        p = self.progress
        if self.train_loader.consumed >= self.updates_per_epoch * self.cfg.train.grad_accum:
            p.epoch += 1
            self.train_loader.set_epoch(p.epoch)
            if self.cfg.eval.every_epoch and self.evaluator.last_eval_step != p.step:
                self.validate()
        self.save(periodic=False)

    def finish(self) -> dict:
        """After the loop: stop if preempted, else calibrate and evaluate test; log the end."""
        cfg, p, ev = self.cfg, self.progress, self.evaluator
        result = {"run_dir": self.run_dir, "step": p.step, "epoch": p.epoch, "val": ev.last_val,
                  "stop_reason": p.stop_reason, "signal": p.signal, "diverged": p.diverged}
        if p.signal:  # the checkpoint is written; leave the test split to the resumed run
            self.log.event("preempted", step=p.step, signal=self.signals.name or p.signal,
                           reason=p.stop_reason)
            return result
        if p.pruned:  # a trial the sweep gave up on: no calibration or test eval
            self.log.event("end", step=p.step, reason=p.stop_reason, pruned=True)
            return {**result, "pruned": True}
        if cfg.calibration.enabled and not p.diverged:
            result["calibration"] = ev.calibrate(p)
            if result["calibration"]:
                self.save(periodic=False)  # last's checkpoint carries the temperature
        if (cfg.eval.test_at_end and cfg.data.test_split and ev.has(cfg.data.test_split)
                and not p.diverged):
            result["test"] = ev.run_eval(cfg.data.test_split, p, final=True)
            if ev.evaluates_ema:
                result["test_ema"] = ev.run_eval(cfg.data.test_split, p, ema=True, final=True)
        self.log.event("end", step=p.step, reason=p.stop_reason or "all epochs done")
        return result

    def validate(self) -> None:
        """Evaluate val; keep best, feed the plateau schedule and early stopping."""
        metrics = self.evaluator.validate(self.progress)
        if not metrics:
            return
        if self.stopper.update(metrics) and self.cfg.checkpoint.save_best:
            self.save(best=True)
        if self.cfg.schedule.name == "plateau":
            self.scheduler.step(self.progress.step, metrics[self.cfg.early_stop.metric])
        if self.stopper.should_stop:
            self.progress.stop_reason = f"early stop: {self.stopper.reason}"
        self.report_to_sweep(metrics)

    def report_to_sweep(self, metrics: dict) -> None:
        """A sweep trial: report val to the study; stop all ranks together when pruned."""
        if not self.cfg.sweep.storage:  # every rank knows: no collective outside a sweep
            return
        try:
            reason = self.trial.report(self.progress.step, metrics)
        except Exception as e:  # noqa: BLE001 - a storage hiccup must not end a days-long run
            self.log.warning(f"sweep: val metrics not reported to the study: {e}",
                             event=TRIAL_REPORT_FAILED, step=self.progress.step)
            reason = ""
        # Rank 0 alone asks the pruner (one decision); every rank must act on it at this step.
        if agree(self.dist, [int(bool(reason))])[0]:
            p = self.progress
            p.pruned = True
            p.stop_reason = f"pruned: {reason or 'by the sweep pruner'}"

    def check_finite(self, out) -> None:
        """Count non-finite steps; stop the run after ``train.max_nonfinite_steps`` in a row."""
        finite = math.isfinite(out.grad_norm)
        if not finite and not out.skipped:
            # The engine applied the update (DeepSpeed fp32/bf16 does not skip): the weights are
            # no longer trustworthy, so stop without checkpointing them; last.pt predates this.
            raise DivergedError(f"step {self.progress.step}: non-finite gradient norm and the "
                                f"{self.engine.name} engine applied the update; the newest "
                                f"checkpoint in {self.checkpoints.directory} predates it")
        if not finite:
            self.log.event("nonfinite", step=self.progress.step, streak=self.nonfinite.streak + 1)
        if self.nonfinite.update(self.progress.step, finite):
            p = self.progress
            p.diverged = True
            p.stop_reason = (f"diverged: {self.nonfinite.streak} consecutive non-finite steps "
                             f"since step {self.nonfinite.first_bad_step}, all skipped, so the "
                             f"saved weights are those from before step "
                             f"{self.nonfinite.first_bad_step}")

    def wall_clock_save_due(self) -> int:
        """1 when ``checkpoint.every_minutes`` have passed since this rank's last save."""
        minutes = self.cfg.checkpoint.every_minutes
        return int(bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes)

    def _log_step(self, loss: float, out, data_s: float, step_s: float) -> None:
        samples = self.cfg.train.batch_size * self.cfg.train.grad_accum * self.dist.world_size
        rec = {"step": self.progress.step, "epoch": self.progress.epoch, "loss": loss,
               "lr": current_lr(self.engine.optimizer), "grad_norm": out.grad_norm,
               "samples_per_s": samples / max(step_s, 1e-9), "data_s": data_s, "step_s": step_s,
               "elapsed_s": time.time() - self.t_start}
        if out.skipped:
            rec["skipped"] = True
        if self.dist.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.log.log_step(rec)

    # ------------------------------------------------------------------------ checkpoints

    @property
    def parts(self) -> dict[str, ckpt.Stateful]:
        """What continues a run besides the engine's weights and optimizer: the one list of the
        checkpoint's entries (written by :meth:`save`, read back by :meth:`restore`)."""
        return {"step": self.progress, "scheduler": self.scheduler, "ema": self.ema,
                "loader": self.train_loader, "early_stop": self.stopper, "rng": self.rngs,
                "nonfinite": self.nonfinite, "calibration": self.temperature}

    def meta(self) -> dict:
        """The JSON sidecar: enough to know what a checkpoint is without loading it."""
        # The resolved config and input specs let ``ddp-train eval/predict`` rebuild the model
        # (and its eval transform) from the checkpoint alone, and a resume report what changed.
        return {"model_name": self.cfg.model.name, "num_classes": self.manifest.num_classes,
                "classes": self.classes, "image_size": self.cfg.data.image_size,
                "config_hash": self.config_hash, "engine": self.engine.name,
                # which weights best.pt was selected on: "model" or "ema" (its "ema" entry)
                "selected_weights": "ema" if self.cfg.early_stop.use_ema else "model",
                "temperature": self.temperature.value, "inputs": self.inputs,
                "config": to_dict(self.cfg)}

    def save(self, periodic: bool = False, best: bool = False) -> None:
        """Write last (and a step checkpoint when periodic), or best; all ranks call.

        A failed save (disk full, quota, I/O error) is logged and training goes on: the
        previous checkpoint is intact (atomic writes), and losing the run would cost more.
        """
        self.watchdog.beat()
        p = self.progress
        state = ckpt.capture(self.parts)  # collective: gathers every rank's RNG state
        try:
            if best:
                self.checkpoints.save_best(state, self.meta(), step=p.step, epoch=p.epoch)
            else:
                self.checkpoints.save(state, self.meta(), step=p.step, epoch=p.epoch,
                                      periodic=periodic)
        except OSError as e:
            self.log.warning(f"checkpoint at step {p.step} not saved, training continues: {e}",
                             event="checkpoint_failed", step=p.step, error=str(e))
        finally:
            if not best:  # also after a failure: retry at the next interval, not every step
                self.last_save = time.monotonic()
            self.watchdog.beat()

    def restore(self, path: str) -> dict[str, list]:
        """Load checkpoint ``path`` into the engine and every part (all ranks); returns the
        config keys that changed since it was written (``{key: [then, now]}``)."""
        try:
            ckpt.restore(self.parts, self.engine.load_checkpoint(path), source=path)
        except ckpt.CheckpointError as e:  # one line for the user, not a traceback
            raise ConfigError(f"run.resume: {e}") from None
        self.progress.epoch = self.train_loader.epoch
        meta = ckpt.read_meta(path) or {}
        if meta.get("config") is None or meta.get("config_hash") == self.config_hash:
            return {}
        return ckpt.config_diff(meta["config"], to_dict(self.cfg))


class DivergedError(RuntimeError):
    """Training cannot continue: a non-finite update reached the weights."""


def train(cfg: Config, dist: DistInfo) -> dict:
    """Build a :class:`Trainer` for ``cfg`` on this rank and run it; returns the final metrics.

    While it runs, stop signals end it with a checkpoint (result["signal"]) and the watchdog
    ends a hung rank.
    """
    trainer = Trainer(cfg, dist)
    trainer.signals.install()
    trainer.watchdog.start()
    try:
        return trainer.fit()
    finally:
        trainer.watchdog.stop()
        trainer.signals.restore()
        trainer.log.close()
