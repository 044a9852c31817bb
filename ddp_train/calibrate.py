"""Temperature scaling (Guo et al., 2017): one scalar T fitted on held-out logits, ``logits / T``.

Neither timm nor torch ships calibration (timm has no temperature scaling or ECE; torchmetrics is
not a dependency), so the fit and the metrics are written here: a one-parameter LBFGS on the
negative log-likelihood, and the standard equal-width-bin expected calibration error. Dividing
logits by T > 0 never changes the argmax: accuracy and F1 stay the same, NLL and ECE improve.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import CalibrationConfig
from .dist import DistInfo, all_gather_objects


def nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    return float(F.cross_entropy(logits.double() / temperature, targets.long()))


def ece(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
        bins: int = 15) -> float:
    """Expected calibration error: the sample-weighted mean over equal-width confidence bins of
    |accuracy - mean confidence| of the top-1 prediction."""
    probs = torch.softmax(logits.double() / temperature, dim=1)
    conf, pred = probs.max(dim=1)
    correct = (pred == targets.long()).double()
    # bin b holds confidences in (b/bins, (b+1)/bins]; confidence 1/C..1 never falls below bin 0
    index = (conf * bins).ceil().long().clamp(1, bins) - 1
    count = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct - conf)
    return float(gap.abs().sum() / count.sum().clamp(min=1))


T_MIN, T_MAX = 0.05, 100.0  # a perfectly separated (or tiny) split would drive T towards 0


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, max_iter: int = 100) -> float:
    """The T > 0 minimising the NLL of ``logits / T`` (LBFGS on log T, so T stays positive),
    clipped to [T_MIN, T_MAX]; 1.0 when there is nothing to fit."""
    if targets.numel() == 0:
        return 1.0
    logits, targets = logits.detach().double().clone(), targets.detach().long().clone()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return min(max(t, T_MIN), T_MAX) if math.isfinite(t) else 1.0


def report(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
           bins: int = 15) -> dict:
    """NLL and ECE at T = 1 ("before") and at ``temperature`` ("after")."""
    return {"temperature": temperature, "samples": int(targets.numel()),
            "nll_before": nll(logits, targets), "nll_after": nll(logits, targets, temperature),
            "ece_before": ece(logits, targets, bins=bins),
            "ece_after": ece(logits, targets, temperature, bins)}


def fit(logits: torch.Tensor, targets: torch.Tensor, cfg: CalibrationConfig) -> dict:
    """Fit T on ``logits``/``targets``; :func:`report` of the result."""
    return report(logits, targets, fit_temperature(logits, targets, cfg.max_iter), cfg.bins)


def describe(rep: dict) -> str:
    """One line: T and NLL/ECE before -> after."""
    return (f"temperature {rep['temperature']:.4f} on {rep['samples']} samples | "
            f"NLL {rep['nll_before']:.4f} -> {rep['nll_after']:.4f} | "
            f"ECE {rep['ece_before']:.4f} -> {rep['ece_after']:.4f}")


class FittedTemperature:
    """The temperature fitted at the end of training (None before): a checkpoint part, so a
    run resumed after calibration (e.g. preempted during the test eval) keeps it."""

    def __init__(self) -> None:
        self.value: Optional[float] = None

    def state_dict(self) -> dict:
        """``{"temperature": T or None}``."""
        return {"temperature": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.value = state["temperature"]


class TemperatureScaled(nn.Module):
    """``model``'s logits divided by a fixed temperature (what eval and predict apply)."""

    def __init__(self, model: nn.Module, temperature: float) -> None:
        super().__init__()
        self.model, self.temperature = model, float(temperature)
        self.train(model.training)

    def forward(self, inputs) -> torch.Tensor:
        return self.model(inputs).float() / self.temperature


class LogitRecorder:
    """A criterion wrapper for :func:`ddp_train.metrics.evaluate` that keeps every batch's logits
    and targets (on the CPU), so one exact-once pass yields both the metrics and the raw logits."""

    def __init__(self, criterion: Callable) -> None:
        self.criterion = criterion
        self.logits: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.logits.append(logits.detach().float().cpu())
        self.targets.append(targets.detach().long().cpu())
        return self.criterion(logits, targets)

    def local(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's logits ``(n, C)`` and targets ``(n,)``; fresh tensors, not inference ones."""
        if not self.logits:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.logits).clone(), torch.cat(self.targets).clone()

    def gathered(self, dist: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's logits and targets concatenated in rank order, on every rank."""
        parts = [p for p in all_gather_objects(dist, self.local()) if p[1].numel()]
        if not parts:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
