"""Training losses for imbalanced data, and mixup/cutmix of a batch (timm's ``Mixup``).

* ``loss.class_weights`` come from the manifest's per-class train counts, so nothing reads the
  data; ``balanced`` is scikit-learn's formula ``n_samples / (n_classes * count)``.
* Focal loss is written here (timm has none for multi-class): cross-entropy (weighted, smoothed
  as torch computes it) scaled by ``(1 - p_t)^gamma``; at ``gamma = 0`` it *is* torch's
  ``cross_entropy``, reduction included.
* With mixup/cutmix the targets are soft, and the loss is timm's ``SoftTargetCrossEntropy``
  (label smoothing moves into the mixed targets). Class weights and focal loss are refused with
  it: their per-class factor has no single class to read from a mixed target. The sampling
  alternative (``data.class_balance``) combines with mixup.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from .config import AugmentConfig, ConfigError, LossConfig
from .config.recipes import check_mixing_batch, check_mixing_loss


def class_weights(spec, class_counts: Sequence[int], num_classes: int) -> Optional[torch.Tensor]:
    """Per-class loss weights for ``loss.class_weights`` (None = unweighted).

    ``balanced``: ``n_samples / (n_classes * count)`` per class, as
    ``sklearn.utils.class_weight.compute_class_weight('balanced')``; a class without train samples
    is an error (its weight would be infinite, and nothing could train it anyway).
    """
    if spec == "none":
        return None
    if spec == "balanced":
        if len(class_counts) != num_classes:
            raise ConfigError("loss.class_weights: balanced needs per-class train counts in the "
                              "shard manifest (class_counts); repack with ddp-shards pack")
        empty = [i for i, c in enumerate(class_counts) if c <= 0]
        if empty:
            raise ConfigError(f"loss.class_weights: balanced, but class index {empty[0]} has no "
                              "train samples")
        total = sum(class_counts)
        return torch.tensor([total / (num_classes * c) for c in class_counts],
                            dtype=torch.float32)
    if len(spec) != num_classes:
        raise ConfigError(f"loss.class_weights: {len(spec)} weights for {num_classes} classes")
    return torch.tensor(spec, dtype=torch.float32)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017) on top of weighted, smoothed cross-entropy.

    Per sample: ``(1 - p_t)^gamma * CE_i`` with ``p_t`` the softmax probability of the true class
    and ``CE_i`` torch's per-sample cross-entropy (class weight and label smoothing included);
    the mean divides by the summed weights of the targets, as torch's weighted mean does.
    """

    def __init__(self, gamma: float, weight: Optional[torch.Tensor] = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.gamma, self.label_smoothing = gamma, label_smoothing
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, targets, weight=self.weight, reduction="none",
                             label_smoothing=self.label_smoothing)
        log_pt = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
        loss = (1 - log_pt.exp()).clamp(min=0).pow(self.gamma) * ce
        norm = self.weight[targets].sum() if self.weight is not None else targets.numel()
        return loss.sum() / norm


def build_criterion(cfg: LossConfig, *, class_counts: Sequence[int], num_classes: int,
                    mixing: bool, device: torch.device) -> nn.Module:
    """The training loss for ``cfg``; ``mixing`` says the targets arrive soft (mixup/cutmix)."""
    if mixing:
        check_mixing_loss(cfg)
        return SoftTargetCrossEntropy()
    weight = class_weights(cfg.class_weights, class_counts, num_classes)
    if weight is not None:
        weight = weight.to(device)
    if cfg.focal_gamma:
        return FocalLoss(cfg.focal_gamma, weight, cfg.label_smoothing).to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


class NoMixup:
    """What the trainer calls when mixup/cutmix are off: the batch passes through unchanged."""

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return images, targets


class BatchMixup(NoMixup):
    """timm's ``Mixup`` on the device batch, switched off from ``mixup_off_epoch`` on.

    timm draws lambda and the mixup/cutmix switch from numpy's global RNG, which the trainer seeds
    and checkpoints, so a resumed run mixes exactly as the uninterrupted one. After the off epoch
    the targets stay soft (one-hot, smoothed), so the loss does not change kind mid-run.
    """

    def __init__(self, cfg: AugmentConfig, label_smoothing: float, num_classes: int) -> None:
        self.off_epoch = cfg.mixup_off_epoch
        self.mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha,
                           prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                           mode=cfg.mixup_mode, label_smoothing=label_smoothing,
                           num_classes=num_classes)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.mixup.mixup_enabled = not self.off_epoch or epoch < self.off_epoch
        return self.mixup(images, targets)


def build_mixup(cfg: AugmentConfig, loss: LossConfig, *, num_classes: int,
                batch_size: int) -> NoMixup:
    """A :class:`BatchMixup` when ``cfg`` mixes, else the pass-through :class:`NoMixup`."""
    if not cfg.mixing:
        return NoMixup()
    check_mixing_batch(batch_size)
    return BatchMixup(cfg, loss.label_smoothing, num_classes)
