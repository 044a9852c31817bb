"""Optimizer and learning-rate schedule from their config sections, through timm's factories."""
from __future__ import annotations

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from .config import ConfigError, OptimConfig, ScheduleConfig


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
