"""The model from its config section: a timm model, or the FiLM fusion model around one."""
from __future__ import annotations

import os
from typing import Optional

import timm
import torch

from ..config import ConfigError, ModelConfig, MultimodalConfig


def build_model(cfg: ModelConfig, num_classes: int, multimodal: Optional[MultimodalConfig] = None,
                inputs: Optional[dict] = None) -> torch.nn.Module:
    """``timm.create_model`` by name; pretrained weights only from a local file, never a download.

    ``cfg.num_classes`` (when > 0) must agree with the dataset's class count. With
    ``multimodal.enabled`` the timm model (features only) becomes the image branch of the FiLM
    fusion model; ``inputs`` are the manifest specs of the extra members loaded (data.extras).
    """
    if cfg.num_classes and cfg.num_classes != num_classes:
        raise ConfigError(f"model.num_classes: {cfg.num_classes} but the shards hold "
                          f"{num_classes} classes")
    if multimodal is not None and multimodal.enabled:
        from .film import FiLMFusion

        backbone = None if multimodal.ablation == "sensor_only" else _timm_model(cfg, 0)
        return FiLMFusion(backbone, inputs or {}, num_classes, multimodal)
    if inputs:
        raise ConfigError("data.extras: a plain timm model takes images only; set "
                          "multimodal.enabled=true or data.extras=[]")
    return _timm_model(cfg, num_classes)


def _timm_model(cfg: ModelConfig, num_classes: int) -> torch.nn.Module:
    """The timm model of ``cfg``; ``num_classes=0`` gives the pooled-features backbone."""
    if cfg.name not in timm.list_models():
        raise ConfigError(f"model.name: {cfg.name!r} is not a timm model "
                          f"(see timm.list_models('*{cfg.name.split('_')[0]}*'))")
    kwargs = dict(num_classes=num_classes, drop_rate=cfg.drop_rate, **cfg.kwargs)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.pretrained:
        if not os.path.isfile(cfg.pretrained):
            raise ConfigError(f"model.pretrained: {cfg.pretrained} is not a file (weights are "
                              "only ever read from a local file)")
        # timm's own pretrained path with a local file: it adapts the classifier to num_classes
        # (and input channels) exactly as it would for hub weights, but fetches nothing.
        return timm.create_model(cfg.name, pretrained=True,
                                 pretrained_cfg_overlay=dict(file=cfg.pretrained), **kwargs)
    return timm.create_model(cfg.name, pretrained=False, **kwargs)
