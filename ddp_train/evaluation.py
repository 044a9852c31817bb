"""The trainer's evaluations: val during training, the temperature fit, the final test eval.

Every evaluation sees each sample of its split exactly once over all ranks
(:func:`ddp_train.metrics.evaluate`), on one model: the engine's (or the EMA's) buffers are
made rank 0's first, so ranks never mix their own BatchNorm statistics. Results go to the logger
as ``eval`` records (``<split>_ema`` for the EMA weights).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

from . import calibrate
from .config import CalibrationConfig, TTAConfig
from .dist import DistInfo, broadcast_object
from .ema import NoEma
from .engine import Engine
from .guard import Watchdog
from .metrics import evaluate
from .runlog import Logger
from .shards.manifest import Manifest
from .tta import TTAModel


class Evaluator:
    """Runs the evaluations of one run; ``make_loader(split, train=False)`` builds eval loaders.

    ``eval_ema`` also evaluates the EMA weights at each val (and test); ``select_ema`` makes
    :meth:`validate` return the EMA's metrics (what picks best and stops early).
    """

    def __init__(self, engine: Engine, ema: NoEma, temperature: calibrate.FittedTemperature, *,
                 make_loader: Callable, manifest: Manifest, dist: DistInfo, log: Logger,
                 watchdog: Watchdog, val_split: str, tta: TTAConfig,
                 calibration: CalibrationConfig, eval_ema: bool, select_ema: bool) -> None:
        self.engine, self.ema, self.temperature = engine, ema, temperature
        self.make_loader, self.manifest, self.dist = make_loader, manifest, dist
        self.log, self.watchdog = log, watchdog
        self.val_split, self.tta, self.calibration = val_split, tta, calibration
        self.evaluates_ema = ema.module is not None and eval_ema
        self.select_ema = select_ema
        self.criterion = nn.CrossEntropyLoss()  # val/test loss: the plain NLL of the labels
        self.last_eval_step = -1  # step of the newest val eval (an epoch end skips a repeat)
        self.last_val: dict = {}  # metrics of the newest val eval

    def has(self, split: str) -> bool:
        """True when ``split`` exists and holds samples."""
        return split in self.manifest.splits and self.manifest.splits[split].num_samples > 0

    def _evaluate(self, split: str, model: Optional[nn.Module] = None,
                  criterion: Optional[Callable] = None, ema: bool = False) -> dict:
        """Metrics of ``model`` on ``split``, each sample once. ``model`` defaults to the bare
        model (or, with ``ema``, its EMA copy) and may wrap it (TTA, temperature)."""
        loader = self.make_loader(split, train=False)
        if ema:
            self.ema.sync()
        else:
            self.engine.sync_buffers()  # one model on all ranks, not each rank's own BN stats
        if model is None:
            model = self.ema.module if ema else self.engine.unwrapped
        return evaluate(model, self.watchdog.watch(loader), criterion or self.criterion,
                        num_classes=self.manifest.num_classes, class_names=self.manifest.classes,
                        device=self.dist.device, dist=self.dist,
                        autocast=self.engine.eval_autocast,
                        # the EMA copy is a plain module: its forward is never collective
                        equal_forwards=self.engine.collective_forward and not ema)

    def run_eval(self, split: str, progress: Any, ema: bool = False, final: bool = False) -> dict:
        """Evaluate the current weights (or their EMA, logged as ``<split>_ema``) on ``split``
        at ``progress`` (its step and epoch go into the record).

        ``final`` (the end-of-training test eval) adds TTA when ``tta.at_test`` and divides the
        model's logits by the fitted temperature (fitted on the model, so not for the EMA), as
        ``ddp-train eval`` would.
        """
        model, extra = self.ema.module if ema else self.engine.unwrapped, {}
        if final and self.tta.at_test:
            model, extra["tta"] = TTAModel(model, self.tta), True
        if final and self.temperature.value is not None and not ema:
            model = calibrate.TemperatureScaled(model, self.temperature.value)
            extra["temperature"] = self.temperature.value
        metrics = self._evaluate(split, model, ema=ema)
        self.log.log_eval({"split": f"{split}_ema" if ema else split, "step": progress.step,
                           "epoch": progress.epoch, **metrics, **extra})
        return metrics

    def validate(self, progress: Any) -> dict:
        """Evaluate val (and its EMA); the metrics that select best.pt, {} without a val split."""
        if not self.val_split or not self.has(self.val_split):
            return {}
        metrics = self.run_eval(self.val_split, progress)
        if self.evaluates_ema:
            ema_metrics = self.run_eval(self.val_split, progress, ema=True)
            metrics = ema_metrics if self.select_ema else metrics
        self.last_eval_step, self.last_val = progress.step, metrics
        return metrics

    def calibrate(self, progress: Any) -> dict:
        """Fit the temperature on ``calibration.split`` (default val) and log NLL/ECE before and
        after; the report, or {} when the split is empty or missing."""
        split = self.calibration.split or self.val_split
        if not split or not self.has(split):
            self.log.info(f"calibration skipped: split {split!r} is empty or missing")
            return {}
        tta = self.tta.at_test  # fit on the logits the test eval will see
        model = TTAModel(self.engine.unwrapped, self.tta) if tta else None
        recorder = calibrate.LogitRecorder(self.criterion)
        self._evaluate(split, model, recorder)
        logits, targets = recorder.gathered(self.dist)
        # Every rank holds the same logits; rank 0's fit is used so all ranks agree bit-exactly.
        report = broadcast_object(self.dist, calibrate.fit(logits, targets, self.calibration))
        self.temperature.value = report["temperature"]
        self.log.event("calibration", step=progress.step, split=split, tta=tta, **report)
        self.log.info(f"calibration on {split}: {calibrate.describe(report)}")
        return report
