"""Optimizer and schedule factories (timm) behave as the config says."""
from __future__ import annotations

import pytest
import torch

from ddp_train.config import ConfigError, OptimConfig, ScheduleConfig
from ddp_train.optim import build_optimizer, build_scheduler, current_lr


def _lrs(cfg: ScheduleConfig, updates_per_epoch: int, total: int, lr: float = 1.0) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(OptimConfig(name="sgd", lr=lr, weight_decay=0.0), model)
    sched = build_scheduler(cfg, opt, updates_per_epoch=updates_per_epoch, total_updates=total)
    out = []
    for step in range(1, total + 1):
        sched.step_update(step)
        out.append(current_lr(opt))
    return out


def test_cosine_with_warmup_in_updates():
    lrs = _lrs(ScheduleConfig(name="cosine", warmup_epochs=1.0, warmup_lr=0.0, min_lr=0.0),
               updates_per_epoch=10, total=100)
    assert lrs[4] == pytest.approx(0.5)  # halfway through a 10-update warmup
    assert lrs[9] == pytest.approx(1.0)  # peak right after warmup
    assert lrs[-1] < 0.01 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_step_schedule_decays_every_step_size_epochs():
    lrs = _lrs(ScheduleConfig(name="step", warmup_epochs=0.0, step_size=10, gamma=0.5),
               updates_per_epoch=4, total=120)
    # StepLR(10 epochs, 0.5) with 4 updates per epoch: halves every 40 updates
    assert lrs[38] == pytest.approx(1.0) and lrs[40] == pytest.approx(0.5)
    assert lrs[80] == pytest.approx(0.25)


def test_constant_schedule():
    assert set(_lrs(ScheduleConfig(name="constant", warmup_epochs=0.0), 5, 30)) == {1.0}


def test_plateau_decays_on_stalled_metric():
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(OptimConfig(name="sgd", lr=1.0, weight_decay=0.0), model)
    sched = build_scheduler(ScheduleConfig(name="plateau", patience=1, gamma=0.1), opt,
                            updates_per_epoch=5, total_updates=50, metric_mode="max")
    sched.step_update(1)  # warmup_epochs 0.5 x 5 updates/epoch = 2 updates of warmup
    assert current_lr(opt) == pytest.approx(0.5, abs=1e-5)
    sched.step_update(2)
    assert current_lr(opt) == pytest.approx(1.0)
    for i, acc in enumerate([0.5, 0.6, 0.6, 0.6]):
        sched.step(3 + i, acc)
    assert current_lr(opt) == pytest.approx(0.1)
    state = sched.state_dict()
    again = build_scheduler(ScheduleConfig(name="plateau", patience=1, gamma=0.1), opt,
                            updates_per_epoch=5, total_updates=50, metric_mode="max")
    again.load_state_dict(state)
    assert again.inner.best == 0.6 and again.inner.num_bad_epochs == state["inner"]["num_bad_epochs"]


def test_optimizers_by_timm_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    for name in ("adamw", "sgd", "lamb"):
        opt = build_optimizer(OptimConfig(name=name, lr=0.1, weight_decay=0.05), model)
        decays = sorted(g["weight_decay"] for g in opt.param_groups)
        assert decays == [0.0, 0.05]  # no decay on biases and norm weights
    with pytest.raises(ConfigError, match="optim.name"):
        build_optimizer(OptimConfig(name="nope"), model)
