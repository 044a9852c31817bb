"""The seam between the training loop and how forward/backward/step run.

``build_engine`` picks one engine per ``engine.name``: :class:`Engine` (one process, in
``base.py``, which also defines the interface), :class:`DDPEngine` (``ddp.py``) or
:class:`DeepSpeedEngine` (``deepspeed_engine.py``, imported only when chosen: deepspeed is an
optional extra). Another engine (FSDP2, say) is one new module and one line in :data:`ENGINES`.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..config import ConfigError, EngineConfig
from ..dist import DistInfo
from .base import Engine, StepOutput
from .ddp import DDPEngine


def _deepspeed() -> type[Engine]:
    from .deepspeed_engine import DeepSpeedEngine  # lazy: deepspeed is an optional extra

    return DeepSpeedEngine


# engine.name -> the engine class (a function, so optional dependencies load only when chosen)
ENGINES: dict[str, Callable[[], type[Engine]]] = {
    "local": lambda: Engine,
    "ddp": lambda: DDPEngine,
    "deepspeed": _deepspeed,
}


def build_engine(cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 dist: DistInfo, *, batch_size: int = 1, grad_accum: int = 1,
                 clip_grad: float = 0.0, channels_last: bool = False,
                 compile: bool = False) -> Engine:
    """Move ``model`` to ``dist.device``, wrap it per ``cfg.name`` (auto: ddp when distributed).

    ``optimizer`` must already hold ``model``'s parameters; moving the model keeps the same
    Parameter objects, so it stays valid. Load checkpoints into the engine after building it.
    ``batch_size`` (per rank and micro-batch) only matters to DeepSpeed, whose config needs it.
    """
    name = cfg.name if cfg.name != "auto" else ("ddp" if dist.distributed else "local")
    if name == "ddp" and not dist.distributed:
        raise ConfigError("engine.name: ddp needs a process group: launch with torchrun "
                          "--nproc_per_node>1 (or use engine.name=auto/local)")
    if dist.device.type == "cuda":
        # Fixed input size: cuDNN benchmarks conv algorithms on the first batch and reuses the
        # fastest for every later step.
        torch.backends.cudnn.benchmark = True
    if cfg.precision == "fp16" and dist.device.type == "cpu":
        warnings.warn("engine.precision=fp16 on CPU works but is slow; use bf16 or fp32 on CPU",
                      stacklevel=2)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(dist.device, memory_format=memory_format)
    return ENGINES[name]()(cfg, model, optimizer, dist, batch_size=batch_size,
                           grad_accum=grad_accum, clip_grad=clip_grad,
                           channels_last=channels_last, compile=compile)


__all__ = ["ENGINES", "DDPEngine", "Engine", "StepOutput", "build_engine"]
