"""The root :class:`Config`: one field per section, and the checks that span sections."""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any

from .fields import check, doc
from .recipes import (AugmentConfig, CalibrationConfig, EmaConfig, LossConfig, TTAConfig,
                      check_mixing_batch, check_mixing_loss)
from .sections import (CheckpointConfig, DataConfig, EarlyStopConfig, EngineConfig, EvalConfig,
                       LogConfig, ModelConfig, MultimodalConfig, OptimConfig, RunConfig,
                       ScheduleConfig, TrainConfig, SweepTrialConfig, WatchdogConfig)


@dataclass
class Config:
    """The whole run. Each component receives only its own section."""

    seed: int = doc(0, "seed for model init, shuffling and augmentation")
    run: RunConfig = doc(None, "run folder and resume")
    data: DataConfig = doc(None, "shards and loader")
    model: ModelConfig = doc(None, "timm model")
    train: TrainConfig = doc(None, "training length and step recipe")
    optim: OptimConfig = doc(None, "optimizer")
    schedule: ScheduleConfig = doc(None, "learning-rate schedule")
    engine: EngineConfig = doc(None, "device, precision, DDP")
    eval: EvalConfig = doc(None, "evaluation")
    checkpoint: CheckpointConfig = doc(None, "checkpoints")
    log: LogConfig = doc(None, "logging")
    early_stop: EarlyStopConfig = doc(None, "model selection and early stopping")
    watchdog: WatchdogConfig = doc(None, "hang detection")
    loss: LossConfig = doc(None, "training loss: class weights, focal, label smoothing")
    augment: AugmentConfig = doc(None, "timm augmentation: auto-augment, random erasing, mixup")
    ema: EmaConfig = doc(None, "moving average of the weights")
    tta: TTAConfig = doc(None, "test-time augmentation")
    calibration: CalibrationConfig = doc(None, "temperature scaling")
    multimodal: MultimodalConfig = doc(None, "image + sensor + env FiLM fusion model")
    sweep: SweepTrialConfig = doc(None, "the sweep trial this run reports to (set by ddp-train "
                                  "sweep)")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is None and dataclasses.is_dataclass(_hint(Config, f.name)):
                setattr(self, f.name, _hint(Config, f.name)())
        if not self.run.name:
            # Resolved here, when the config is built, so --print-config and <run>/config.yaml
            # show the real name. A copy: a RunConfig shared between Configs stays unresolved.
            self.run = dataclasses.replace(self.run, name=default_run_name(self.data.shards))
        check_across_sections(self)


def default_run_name(shards: str) -> str:
    """The run name when ``run.name`` is '': the name of the dataset folder ``shards``.

    ``shards/defects`` -> ``defects``; a URL prefix or ``{}`` template gives its last path
    component (``s3://bucket/ds`` and ``pipe:aws s3 cp s3://bucket/ds/{} -`` -> ``ds``).
    """
    folder = shards.split("{}", 1)[0]  # a template: the folder the file name is put into
    if "://" in folder or folder.startswith("pipe:"):
        name = folder.rstrip("/").rsplit("/", 1)[-1].strip()
    else:  # a local folder: abspath so "." and "shards/defects/" give a real folder name
        name = os.path.basename(os.path.abspath(folder))
    check(bool(name), "run.name", f"cannot be derived from data.shards {shards!r}: set run.name")
    return name


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def check_across_sections(cfg: Config) -> None:
    """Checks that span sections, run when the whole Config is built (before any run folder)."""
    check(not cfg.early_stop.use_ema or cfg.ema.enabled, "early_stop.use_ema",
          "needs an EMA to select on: set ema.decay (e.g. 0.9999)")
    if cfg.augment.mixing:
        check_mixing_loss(cfg.loss)
        check(not cfg.data.extras, "augment.mixup_alpha",
              "mixup/cutmix mix images only; with data.extras (multimodal inputs) the sensor and "
              "env features would keep one sample's values under a blend of two images")
        check_mixing_batch(cfg.train.batch_size)
