"""Exponential moving average of the weights: timm's ``ModelEmaV3``, checkpointed with the run.

The EMA is kept in fp32 on every rank (whatever the training precision: a bf16 EMA would need
timm's stochastic rounding, whose private RNG is not part of a checkpoint, so resumes would not
be exact). Parameters stay identical on all ranks (same start, same all-reduced updates), but
BatchNorm buffers are each rank's own running statistics; :meth:`WeightsEma.sync` copies rank
0's into the other ranks before every evaluation and every checkpoint, so all ranks evaluate
the same EMA and a resumed run (which loads rank 0's copy everywhere) continues exactly.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from timm.utils import ModelEmaV3
from torch import nn

from .config import ConfigError, EmaConfig
from .dist import DistInfo, broadcast_tensors


class NoEma:
    """What the trainer holds when ``ema.decay`` is 0: every call does nothing."""

    module: Optional[nn.Module] = None

    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's weights after optimizer update ``step`` into the average."""

    def sync(self) -> None:
        """Make every rank's buffers rank 0's (before eval and checkpoint)."""

    def state_dict(self) -> Optional[dict[str, Any]]:
        """The EMA weights as a plain model state_dict (None without an EMA)."""
        return None

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        """Restore :meth:`state_dict`."""


class WeightsEma(NoEma):
    """timm ``ModelEmaV3`` of the bare model, updated with the optimizer-update count."""

    def __init__(self, cfg: EmaConfig, model: nn.Module, dist: DistInfo) -> None:
        self.dist = dist
        self.ema = ModelEmaV3(model, decay=cfg.decay, use_warmup=cfg.warmup,
                              warmup_gamma=cfg.warmup_gamma, warmup_power=cfg.warmup_power,
                              dtype=torch.float32)
        self.module = self.ema.module

    def update(self, model: nn.Module, step: int) -> None:
        # ``step`` drives timm's warmup; without warmup the first update (step 1) still copies
        # the weights (decay 0), so the average starts from the trained model, not the init.
        self.ema.update(model, step=step)

    def sync(self) -> None:
        broadcast_tensors(self.dist, list(self.module.buffers()))

    def state_dict(self) -> Optional[dict[str, Any]]:
        """Rank 0's EMA (collective: buffers are synced first, so all ranks agree)."""
        self.sync()
        return self.module.state_dict()

    def load_state_dict(self, state: Optional[dict[str, Any]]) -> None:
        if state is None:
            raise ConfigError("ema.decay: the checkpoint holds no EMA weights (it was written "
                              "without ema.decay); resume it without an EMA")
        self.module.load_state_dict(state)


def build_ema(cfg: EmaConfig, model: nn.Module, dist: DistInfo, *,
              replicated: bool = True) -> NoEma:
    """A :class:`WeightsEma` of ``model`` (the engine's bare, device-placed model), or NoEma.

    ``replicated`` is the engine's answer to "does every rank hold whole weights?": under ZeRO-3
    each rank holds only a slice of every parameter, so there is no full model to average.
    """
    if not cfg.enabled:
        return NoEma()
    if not replicated:
        raise ConfigError("ema.decay: an EMA needs whole weights on each rank; this engine "
                          "partitions them (ZeRO-3: use zero_optimization.stage <= 2)")
    return WeightsEma(cfg, model, dist)
