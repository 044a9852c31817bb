"""The training loop: build everything from the config, then train/eval/checkpoint in fixed order.

The loop reads top to bottom with plain calls: next batch -> forward -> backward -> engine.step
-> (on an optimizer update) schedule, log, eval when due, checkpoint when due, stop when due.
Single process, DDP and DeepSpeed are hidden behind :mod:`ddp_train.engine` (which also writes
and reads checkpoints); rank 0 versus the rest behind the logger (a NullLogger off rank 0) and
the engine's checkpoint writer.
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
from torch import nn

from . import calibrate
from . import checkpoint as ckpt
from .config import Config, ConfigError, to_dict
from .data import build_loader
from .data.loader import extra_specs
from .dist import DistInfo, all_gather_objects, broadcast_object
from .ema import build_ema
from .engine import build_engine
from .guard import NonFiniteGuard, StopSignals, Watchdog, agree
from .losses import build_criterion, build_mixup
from .metrics import EarlyStopping, evaluate
from .models import build_model
from .optim import build_optimizer, build_scheduler, current_lr
from .runlog import create_run_dir, make_logger, problems_path, write_config
from .shards.manifest import load_manifest
from .tta import TTAModel


@dataclass
class Progress:
    """Where training stands: what a checkpoint must restore besides weights and optimizer."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # current epoch (the loader's epoch counter)
    stop_reason: str = ""  # set when early stopping, max_steps, a signal or divergence ends it
    signal: int = 0  # the stop signal that ended this launch (0 = none)
    diverged: bool = False  # stopped on non-finite steps


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
        self.classes = self.manifest.classes
        try:  # specs of the extra members (multimodal inputs) the loaders will yield
            self.inputs = extra_specs(self.manifest, cfg.data.extras)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.temperature: float | None = None  # set by calibrate() at the end of training
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
        self.eval_criterion = nn.CrossEntropyLoss()  # val/test loss: the plain NLL of the labels
        self.mixup = build_mixup(cfg.augment, cfg.loss, num_classes=self.manifest.num_classes,
                                 batch_size=cfg.train.batch_size)
        zero = (cfg.engine.deepspeed.get("zero_optimization", {}).get("stage", 0)
                if self.engine.name == "deepspeed" else 0)
        self.ema = build_ema(cfg.ema, self.engine.unwrapped, dist, zero_stage=int(zero))
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
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.signals = StopSignals()
        self.watchdog = Watchdog(cfg.watchdog.timeout, self.run_dir, dist.rank)
        self.last_eval_step = -1
        self.t_start = time.time()
        self.last_save = time.monotonic()
        with warnings.catch_warnings(record=True) as skipped:  # corrupt checkpoints passed over
            warnings.simplefilter("always")
            resume_from = self.checkpoints.resume_path(run_cfg.resume)
        if resume_from:
            self.restore(resume_from)
        write_config(self.run_dir, to_dict(cfg), dist)
        self.log = make_logger(cfg.log, self.run_dir, dist, total_steps=self.total_steps,
                               resumed_from_step=self.progress.step if resume_from else None,
                               config=to_dict(cfg))
        for w in skipped:
            self.log.info(f"WARNING: {w.message}")
        if resume_from:
            self.log.info(f"resumed from {resume_from} at step {self.progress.step}")

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
        """Train until epochs, max_steps or early stopping; evaluate test at the end."""
        cfg, p, log = self.cfg, self.progress, self.log
        log.info(f"run {self.run_dir} | {cfg.model.name} | {self.dist.world_size} rank(s) x "
                 f"batch {cfg.train.batch_size} x accum {cfg.train.grad_accum} | "
                 f"{self.updates_per_epoch} updates/epoch | {self.total_steps} updates")
        log.event("start", step=p.step, world_size=self.dist.world_size, model=cfg.model.name,
                  batch_size=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                  updates_per_epoch=self.updates_per_epoch, total_steps=self.total_steps,
                  train_samples=self.train_loader.num_samples, classes=self.classes,
                  shards=cfg.data.shards, engine=self.engine.name,
                  precision=cfg.engine.precision)
        last_val: dict = {}
        while p.step < self.total_steps and not p.stop_reason:
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
                self._log_step(loss_sum.item() / cfg.train.grad_accum, out, data_s,
                               t_last - t_prev)
                data_s, loss_sum = 0.0, torch.zeros((), device=self.dist.device)
                self.check_finite(out)
                if cfg.eval.every_steps and p.step % cfg.eval.every_steps == 0:
                    last_val = self.validate() or last_val
                # Every rank votes once per update, so all act on the same step: a stop signal
                # that reached one rank, or a wall-clock checkpoint that one rank's clock says
                # is due.
                stop_signal, time_due = agree(self.dist, [self.signals.received,
                                                          self.wall_clock_save_due()])
                if p.step >= self.total_steps:
                    p.stop_reason = p.stop_reason or f"finished {self.total_steps} updates"
                elif stop_signal and not p.stop_reason:
                    p.signal = stop_signal
                    p.stop_reason = f"preempted by {self.signals.name or stop_signal}"
                if p.stop_reason:
                    break
                if time_due or (cfg.checkpoint.every_steps
                                and p.step % cfg.checkpoint.every_steps == 0):
                    self.save(periodic=True)
                t_prev = t_last = time.perf_counter()  # eval/checkpoint time is not data wait
            if self.train_loader.consumed >= epoch_micro:  # the epoch ran to its end
                p.epoch += 1
                self.train_loader.set_epoch(p.epoch)
                if cfg.eval.every_epoch and self.last_eval_step != p.step:
                    last_val = self.validate() or last_val
            self.save(periodic=False)
        log.info(f"stopped: {p.stop_reason or 'all epochs done'}")
        result = {"run_dir": self.run_dir, "step": p.step, "epoch": p.epoch, "val": last_val,
                  "stop_reason": p.stop_reason, "signal": p.signal, "diverged": p.diverged}
        if p.signal:  # the checkpoint is written; leave the test split to the resumed run
            log.event("preempted", step=p.step, signal=self.signals.name or p.signal)
            return result
        if cfg.calibration.enabled and not p.diverged:
            result["calibration"] = self.calibrate()
        if (cfg.eval.test_at_end and cfg.data.test_split and self._has(cfg.data.test_split)
                and not p.diverged):
            result["test"] = self.run_eval(cfg.data.test_split, final=True)
            if self.ema.module is not None and (cfg.ema.eval or cfg.early_stop.use_ema):
                result["test_ema"] = self.run_eval(cfg.data.test_split, ema=True, final=True)
        log.event("end", step=p.step, reason=p.stop_reason or "epochs")
        return result

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

    # ------------------------------------------------------------------------- evaluation

    def _has(self, split: str) -> bool:
        return split in self.manifest.splits and self.manifest.splits[split].num_samples > 0

    def _evaluate(self, split: str, model=None, criterion=None, ema: bool = False) -> dict:
        """Metrics of ``model`` on ``split``, each sample once. ``model`` defaults to the bare
        model (or, with ``ema``, its EMA copy) and may wrap it (TTA, temperature)."""
        loader = self._loader(split, train=False)
        if ema:
            self.ema.sync()
        else:
            self.engine.sync_buffers()  # one model on all ranks, not each rank's own BN stats
        if model is None:
            model = self.ema.module if ema else self.engine.unwrapped
        return evaluate(model, self.watchdog.watch(loader),
                        criterion or self.eval_criterion, num_classes=self.manifest.num_classes,
                        class_names=self.classes, device=self.dist.device, dist=self.dist,
                        autocast=self.engine_autocast,
                        # the EMA copy is a plain module: its forward is never collective
                        equal_forwards=self.engine.collective_forward and not ema)

    def run_eval(self, split: str, ema: bool = False, final: bool = False) -> dict:
        """Evaluate the current weights (or their EMA, logged as ``<split>_ema``) on ``split``
        (every sample exactly once over all ranks).

        ``final`` (the end-of-training test eval) adds TTA when ``tta.at_test`` and divides the
        model's logits by the fitted temperature (fitted on the model, so not for the EMA), as
        ``ddp-train eval`` would.
        """
        model, extra = self.ema.module if ema else self.engine.unwrapped, {}
        if final and self.cfg.tta.at_test:
            model, extra["tta"] = TTAModel(model, self.cfg.tta), True
        if final and self.temperature is not None and not ema:
            model = calibrate.TemperatureScaled(model, self.temperature)
            extra["temperature"] = self.temperature
        metrics = self._evaluate(split, model, ema=ema)
        self.log.log_eval({"split": f"{split}_ema" if ema else split, "step": self.progress.step,
                           "epoch": self.progress.epoch, **metrics, **extra})
        return metrics

    def calibrate(self) -> dict:
        """Fit the temperature on ``calibration.split`` (default val), log NLL/ECE before and
        after, and re-save last so its checkpoint carries the temperature."""
        split = self.cfg.calibration.split or self.cfg.data.val_split
        if not split or not self._has(split):
            self.log.info(f"calibration skipped: split {split!r} is empty or missing")
            return {}
        tta = self.cfg.tta.at_test  # fit on the logits the test eval will see
        model = TTAModel(self.engine.unwrapped, self.cfg.tta) if tta else None
        recorder = calibrate.LogitRecorder(self.eval_criterion)
        self._evaluate(split, model, recorder)
        logits, targets = recorder.gathered(self.dist)
        # Every rank holds the same logits; rank 0's fit is used so all ranks agree bit-exactly.
        report = broadcast_object(self.dist, calibrate.fit(logits, targets, self.cfg.calibration))
        self.temperature = report["temperature"]
        self.log.event("calibration", step=self.progress.step, split=split, tta=tta, **report)
        self.log.info(f"calibration on {split}: {calibrate.describe(report)}")
        self.save(periodic=False)
        return report

    def engine_autocast(self):
        """Mixed precision for evaluation (no DDP no_sync: eval uses the bare model)."""
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.engine.precision)
        return torch.autocast(self.dist.device.type, dtype=dtype, enabled=dtype is not None)

    def validate(self) -> dict:
        """Evaluate val, keep best.pt, feed the plateau schedule and early stopping."""
        split = self.cfg.data.val_split
        if not split or not self._has(split):
            return {}
        metrics = self.run_eval(split)
        if self.ema.module is not None and (self.cfg.ema.eval or self.cfg.early_stop.use_ema):
            ema_metrics = self.run_eval(split, ema=True)
            metrics = ema_metrics if self.cfg.early_stop.use_ema else metrics
        self.last_eval_step = self.progress.step
        if self.stopper.update(metrics) and self.cfg.checkpoint.save_best:
            self.save(best=True)
        if self.cfg.schedule.name == "plateau":
            self.scheduler.step(self.progress.step, metrics[self.cfg.early_stop.metric])
        if self.stopper.should_stop:
            self.progress.stop_reason = f"early stop: {self.stopper.reason}"
        return metrics

    # ------------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """What continues a run besides the engine's weights and optimizer: schedule, data, RNGs.

        The engine saves it next to its own state (DeepSpeed: as its client_state).
        """
        # Each rank's RNG differs (dropout seeds), so all of them go into rank 0's copy.
        rngs = all_gather_objects(self.dist, ckpt.rng_state())
        self.ema.sync()
        return {"scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict(), "loader": self.train_loader.state_dict(), "rng": rngs,
                "early_stop": self.stopper.state_dict(), "step": self.progress.step,
                "nonfinite": self.nonfinite.state_dict(),
                "epoch": self.progress.epoch, "config_hash": self.config_hash,
                "calibration": {"temperature": self.temperature}}

    def meta(self) -> dict:
        """The JSON sidecar: enough to know what a checkpoint is without loading it."""
        # The resolved config and input specs let ``ddp-train eval/predict`` rebuild the model
        # (and its eval transform) from the checkpoint alone.
        return {"model_name": self.cfg.model.name, "num_classes": self.manifest.num_classes,
                "classes": self.classes, "image_size": self.cfg.data.image_size,
                "config_hash": self.config_hash, "engine": self.engine.name,
                # which weights best.pt was selected on: "model" or "ema" (state["ema"])
                "selected_weights": "ema" if self.cfg.early_stop.use_ema else "model",
                "temperature": self.temperature, "inputs": self.inputs,
                "config": to_dict(self.cfg)}

    def save(self, periodic: bool = False, best: bool = False) -> None:
        """Write last (and a step checkpoint when periodic), or best; all ranks call.

        A failed save (disk full, quota, I/O error) is logged and training goes on: the
        previous checkpoint is intact (atomic writes), and losing the run would cost more.
        """
        self.watchdog.beat()
        state = self.state()
        try:
            if best:
                self.checkpoints.save_best(state, self.meta())
                return
            self.checkpoints.save(state, self.meta(), step=self.progress.step,
                                  epoch=self.progress.epoch, periodic=periodic)
        except OSError as e:
            self.log.info(f"WARNING: checkpoint at step {self.progress.step} not saved, "
                          f"training continues: {e}")
            self.log.event("checkpoint_failed", step=self.progress.step, error=str(e))
        finally:
            if not best:  # also after a failure: retry at the next interval, not every step
                self.last_save = time.monotonic()
            self.watchdog.beat()

    def restore(self, path: str) -> None:
        """Load a checkpoint written by :meth:`save` into every component (all ranks)."""
        state = self.engine.load_checkpoint(path)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        self.stopper.load_state_dict(state["early_stop"])
        if self.ema.module is not None:
            self.ema.load_state_dict(state.get("ema"))
        if state.get("nonfinite"):  # absent in checkpoints written before the guard existed
            self.nonfinite.load_state_dict(state["nonfinite"])
        self.progress = Progress(step=int(state["step"]), epoch=self.train_loader.epoch)
        rngs = state["rng"]
        if len(rngs) == self.dist.world_size:  # another world size cannot continue bit-exactly
            ckpt.set_rng_state(rngs[self.dist.rank])


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

