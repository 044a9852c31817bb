"""Model, optimizer and LR schedule from their config sections, all through timm's factories."""
from __future__ import annotations

import os
from typing import Optional

import timm
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .config import ConfigError, ModelConfig, MultimodalConfig, OptimConfig, ScheduleConfig


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
        from .models.film import FiLMFusion

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


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm ``create_optimizer_v2``: weight decay skips biases and norm parameters."""
    kwargs = {}
    if cfg.betas is not None:
        kwargs["betas"] = tuple(cfg.betas)
    if cfg.eps is not None:
        kwargs["eps"] = cfg.eps
    try:
        return create_optimizer_v2(model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                   momentum=cfg.momentum, **kwargs)
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"optim.name: {cfg.name!r} ({e})") from None


def build_scheduler(cfg: ScheduleConfig, optimizer: torch.optim.Optimizer, *,
                    updates_per_epoch: int, total_updates: int, metric_mode: str = "max"):
    """A timm scheduler counted in optimizer updates (``step_update``), warmup included.

    ``plateau`` is the exception: timm steps it per evaluation with the metric (``step``);
    ``metric_mode`` says whether that metric improves upwards ("max") or downwards ("min").
    """
    warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * updates_per_epoch))
    if cfg.name == "plateau":
        return PlateauSchedule(optimizer, cfg, warmup=warmup, mode=metric_mode)
    # Everything is expressed in updates (updates_per_epoch=1) so schedules are identical
    # whatever the epoch length, and warmup may end mid-epoch.
    sched = {"cosine": "cosine", "step": "step", "constant": "step"}[cfg.name]
    decay = cfg.step_size * updates_per_epoch if cfg.name == "step" else total_updates + 1
    # Cosine: the decay starts after warmup (warmup_prefix), so the peak lr is reached and the
    # curve ends at the last update. Step: decays stay at fixed epochs, as StepLR's do.
    prefix = cfg.name == "cosine"
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=max(1, total_updates - warmup) if prefix
        else total_updates, decay_epochs=decay, warmup_prefix=prefix,
        decay_rate=cfg.gamma if cfg.name == "step" else 1.0, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=warmup, step_on_epochs=False, updates_per_epoch=1)
    return scheduler


class PlateauSchedule:
    """torch's ReduceLROnPlateau behind timm's scheduler interface, with a linear warmup.

    Written here because timm's PlateauLRScheduler is deprecated and does not checkpoint its
    state (best metric, patience counter): a resumed multi-day run would restart the plateau
    logic. torch's scheduler has a state_dict; this adapter only adds the warmup.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, *, warmup: int,
                 mode: str) -> None:
        self.optimizer, self.warmup, self.warmup_lr = optimizer, warmup, cfg.warmup_lr
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=cfg.gamma, patience=cfg.patience, min_lr=cfg.min_lr)
        self.step_update(0)

    def step_update(self, num_updates: int) -> None:
        """Per update: only the warmup ramp; afterwards the lr moves on evaluations alone."""
        if num_updates < self.warmup:
            frac = num_updates / self.warmup
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = self.warmup_lr + (base - self.warmup_lr) * frac
        elif num_updates == self.warmup:
            for group, base in zip(self.optimizer.param_groups, self.base_lrs):
                group["lr"] = base

    def step(self, num_updates: int, metric: float) -> None:
        """Per evaluation: decay by gamma after ``patience`` evals without improvement."""
        if num_updates >= self.warmup:
            self.inner.step(metric)

    def state_dict(self) -> dict:
        """Plateau counters, best metric and warmup settings (checkpointed)."""
        return {"inner": self.inner.state_dict(), "base_lrs": self.base_lrs,
                "warmup": self.warmup, "warmup_lr": self.warmup_lr}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.inner.load_state_dict(state["inner"])
        self.base_lrs, self.warmup = state["base_lrs"], state["warmup"]
        self.warmup_lr = state["warmup_lr"]


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group (what logs report)."""
    return float(optimizer.param_groups[0]["lr"])
