"""Typed configuration: dataclass sections loaded from YAML + overrides.

``fields`` (error type and field helpers) <- ``sections`` (core sections) and ``recipes`` (loss,
augmentation, EMA, TTA, calibration) <- ``root`` (:class:`Config`, cross-section checks) <-
``load`` (YAML, overrides, printing). Each component receives only its own section
(``cfg.data``, ``cfg.engine``, ...).
"""
from .fields import ConfigError, doc
from .load import (annotated_yaml, describe, dump_yaml, from_dict, load_config, parse_override,
                   to_dict)
from .recipes import AugmentConfig, CalibrationConfig, EmaConfig, LossConfig, TTAConfig
from .root import Config
from .sections import (CheckpointConfig, DataConfig, EarlyStopConfig, EngineConfig, EvalConfig,
                       LogConfig, ModelConfig, MultimodalConfig, OptimConfig, RunConfig,
                       ScheduleConfig, TrainConfig, SweepTrialConfig, WatchdogConfig)

__all__ = ["AugmentConfig", "CalibrationConfig", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "EarlyStopConfig", "EmaConfig", "EngineConfig", "EvalConfig",
           "LogConfig", "LossConfig", "ModelConfig", "MultimodalConfig", "OptimConfig",
           "RunConfig", "ScheduleConfig", "TTAConfig", "TrainConfig", "SweepTrialConfig",
           "WatchdogConfig",
           "annotated_yaml", "describe", "doc", "dump_yaml", "from_dict", "load_config",
           "parse_override", "to_dict"]
