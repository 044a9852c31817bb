"""Multimodal severity model: a timm image backbone + a sensor-window encoder, FiLM-conditioned on
environment features (Perez et al., 2018, "FiLM: Visual Reasoning with a General Conditioning
Layer").

Input: a dict ``{"image": (B, 3, H, W), "sensor": (B, C, T) or (B, T), "env": (B, E)}`` as the
loader yields it with ``data.extras: [sensor, env]``. The image branch is any timm model built
with ``num_classes=0`` (its pooled features); the sensor branch is a small 1-D CNN or an MLP.
Their features are concatenated and projected to ``fusion_dim``; an MLP over the env features
gives a per-channel scale and shift, ``h * (1 + gamma) + beta``, applied before the classifier.
Ablations (``multimodal.ablation``): ``image_only`` / ``sensor_only`` drop one branch (FiLM
stays), ``no_film`` concatenates the env features to the fusion input instead of modulating.
Written here because timm has image backbones only and no conditioning layers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import ConfigError, MultimodalConfig


def input_size(spec: dict) -> list[int]:
    """Per-sample tensor shape of an extra member, from its manifest spec."""
    return [len(spec["keys"])] if "keys" in spec else list(spec["shape"])


class SensorEncoder(nn.Module):
    """A ``(B, C, T)`` window (``(B, T)`` = one channel) -> ``(B, out_dim)`` features.

    ``conv``: two 1-D convolutions over time, then global average pooling (any window length);
    ``mlp``: the flattened window through two linear layers (fixed window length). Channels are
    standardised by a BatchNorm first, since raw sensor units can be far from unit scale.
    """

    def __init__(self, shape: list[int], out_dim: int, kind: str = "conv") -> None:
        super().__init__()
        if len(shape) not in (1, 2):
            raise ConfigError(f"multimodal: a sensor window must be [T] or [channels, T], "
                              f"got shape {shape}")
        channels, length = (1, shape[0]) if len(shape) == 1 else shape
        self.norm = nn.BatchNorm1d(channels)
        if kind == "conv":
            width = max(16, out_dim // 2)
            self.net = nn.Sequential(
                nn.Conv1d(channels, width, 5, padding=2), nn.GELU(),
                nn.Conv1d(width, out_dim, 5, stride=2, padding=2), nn.GELU(),
                nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(out_dim, out_dim))
        else:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(channels * length, 2 * out_dim),
                                     nn.GELU(), nn.Linear(2 * out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.net(self.norm(x))


class FiLM(nn.Module):
    """Scale and shift per feature channel computed from a conditioning vector.

    The last layer starts at zero, so the module starts as the identity (gamma = beta = 0).
    """

    def __init__(self, cond_dim: int, hidden: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(cond_dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, 2 * channels))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.net(cond).chunk(2, dim=1)
        return h * (1 + gamma) + beta


class FiLMFusion(nn.Module):
    """Image backbone + sensor encoder fused, FiLM from env, then a linear classifier."""

    def __init__(self, backbone: Optional[nn.Module], inputs: dict[str, dict], num_classes: int,
                 cfg: MultimodalConfig) -> None:
        super().__init__()
        self.ablation = cfg.ablation
        needed = ["env"] + ([] if cfg.ablation == "image_only" else ["sensor"])
        missing = [name for name in needed if name not in inputs]
        if missing:
            raise ConfigError(f"multimodal: data.extras must include {', '.join(missing)} "
                              f"(ablation {cfg.ablation})")
        if backbone is None and cfg.ablation != "sensor_only":
            raise ConfigError("multimodal: the image branch needs a backbone")
        self.backbone = backbone if cfg.ablation != "sensor_only" else None
        self.sensor = (SensorEncoder(input_size(inputs["sensor"]), cfg.sensor_dim,
                                     cfg.sensor_encoder) if "sensor" in needed else None)
        env_dim = math.prod(input_size(inputs["env"]))
        self.env_norm = nn.BatchNorm1d(env_dim)  # env features come in raw units (deg C, %)
        width = ((self.backbone.num_features if self.backbone is not None else 0)
                 + (cfg.sensor_dim if self.sensor is not None else 0)
                 + (env_dim if cfg.ablation == "no_film" else 0))
        self.fuse = nn.Sequential(nn.Linear(width, cfg.fusion_dim), nn.GELU())
        self.film = (FiLM(env_dim, cfg.env_hidden, cfg.fusion_dim)
                     if cfg.ablation != "no_film" else None)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.fusion_dim, num_classes))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        env = self.env_norm(inputs["env"].flatten(1))
        features = []
        if self.backbone is not None:
            features.append(self.backbone(inputs["image"]))
        if self.sensor is not None:
            features.append(self.sensor(inputs["sensor"]))
        if self.film is None:
            features.append(env)
        h = self.fuse(torch.cat(features, dim=1))
        if self.film is not None:
            h = self.film(h, env)
        return self.head(h)
