"""Typed configuration: dataclass sections (``sections``) loaded from YAML + overrides (``load``).

Each component receives only its own section (``cfg.data``, ``cfg.engine``, ...).
"""
from .load import (annotated_yaml, describe, dump_yaml, from_dict, load_config, parse_override,
                   to_dict)
from .recipes import AugmentConfig, EmaConfig, LossConfig
from .sections import (CheckpointConfig, Config, ConfigError, DataConfig, EarlyStopConfig,
                       EngineConfig, EvalConfig, LogConfig, ModelConfig, OptimConfig, RunConfig,
                       ScheduleConfig, TrainConfig, WatchdogConfig, doc)
from .infer import CalibrationConfig, MultimodalConfig, TTAConfig

__all__ = ["AugmentConfig", "EmaConfig", "LossConfig", "annotated_yaml", "describe", "dump_yaml", "from_dict", "load_config",
           "parse_override", "to_dict", "CheckpointConfig", "Config", "ConfigError",
           "DataConfig", "EarlyStopConfig", "EngineConfig", "EvalConfig", "LogConfig",
           "ModelConfig", "OptimConfig", "RunConfig", "ScheduleConfig", "TrainConfig",
           "WatchdogConfig", "doc", "CalibrationConfig", "MultimodalConfig", "TTAConfig"]
