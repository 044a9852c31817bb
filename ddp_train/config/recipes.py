"""Config sections for the recipes: loss (class imbalance), augmentation, weight EMA, TTA and
temperature calibration.

Kept apart from ``sections.py`` so the core sections stay short; ``Config`` (``root.py``) holds one
field per section here. docs/recipes.md shows them in use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .fields import check, doc, one_of

# First dash-separated token of a timm auto-augment string, and what it selects.
AUTO_AUGMENT_POLICIES = ("rand", "augmix", "trivial", "original", "originalr", "v0", "v0r", "3a")


@dataclass
class LossConfig:
    """The training loss: class weights, focal loss and label smoothing."""

    class_weights: Union[str, list[float]] = doc(
        "none", "none, balanced (n_samples / (n_classes * count), from the manifest's train "
        "class counts) or one weight per class")
    focal_gamma: float = doc(0.0, "focal loss exponent: (1 - p_t)^gamma scales each sample's loss "
                             "(0 = plain cross-entropy)")
    label_smoothing: float = doc(0.0, "label smoothing of the train targets (with mixup: of the "
                                 "mixed targets)")

    def __post_init__(self) -> None:
        if isinstance(self.class_weights, str):
            one_of(self.class_weights, "loss.class_weights", ("none", "balanced"))
        else:
            check(len(self.class_weights) > 0 and all(w > 0 for w in self.class_weights),
                  "loss.class_weights", "a list needs one positive weight per class")
        check(self.focal_gamma >= 0, "loss.focal_gamma", "must be >= 0")
        check(0 <= self.label_smoothing < 1, "loss.label_smoothing", "must be in [0, 1)")

    @property
    def weighted(self) -> bool:
        """True when the loss weighs classes differently."""
        return self.class_weights != "none"


@dataclass
class AugmentConfig:
    """Train-time augmentation through timm (eval transforms stay deterministic)."""

    auto_augment: str = doc("", "timm RandAugment/AutoAugment/AugMix policy string, e.g. "
                            "rand-m9-mstd0.5-inc1 or original ('' = off)")
    re_prob: float = doc(0.0, "random erasing probability per image (0 = off)")
    re_mode: str = doc("pixel", "random erasing fill: const, rand (per channel) or pixel (noise)")
    re_count: int = doc(1, "random erasing: at most this many boxes per image")
    mixup_alpha: float = doc(0.0, "mixup Beta(alpha, alpha) (0 = no mixup)")
    cutmix_alpha: float = doc(0.0, "cutmix Beta(alpha, alpha) (0 = no cutmix)")
    mixup_prob: float = doc(1.0, "probability that a batch is mixed at all")
    mixup_switch_prob: float = doc(0.5, "probability of cutmix instead of mixup when both are on")
    mixup_mode: str = doc("batch", "one lambda per batch, per pair or per element")
    mixup_off_epoch: int = doc(0, "no mixing from this epoch on (0 = mix until the end)")

    def __post_init__(self) -> None:
        policy = self.auto_augment.split("-")[0]
        check(not self.auto_augment or policy in AUTO_AUGMENT_POLICIES, "augment.auto_augment",
              f"{self.auto_augment!r} does not start with one of {', '.join(AUTO_AUGMENT_POLICIES)}")
        check(0 <= self.re_prob <= 1, "augment.re_prob", "must be a probability in [0, 1]")
        one_of(self.re_mode, "augment.re_mode", ("const", "rand", "pixel"))
        check(self.re_count >= 1, "augment.re_count", "must be >= 1")
        check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "augment.mixup_alpha/cutmix_alpha",
              "must be >= 0")
        check(0 <= self.mixup_prob <= 1, "augment.mixup_prob", "must be a probability in [0, 1]")
        check(0 <= self.mixup_switch_prob <= 1, "augment.mixup_switch_prob",
              "must be a probability in [0, 1]")
        one_of(self.mixup_mode, "augment.mixup_mode", ("batch", "pair", "elem"))
        check(self.mixup_off_epoch >= 0, "augment.mixup_off_epoch", "must be >= 0")

    @property
    def mixing(self) -> bool:
        """True when mixup or cutmix is configured (targets become soft)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mixup_prob > 0


@dataclass
class EmaConfig:
    """An exponential moving average of the weights (timm ModelEmaV3), kept in fp32."""

    decay: float = doc(0.0, "EMA decay per optimizer update, e.g. 0.9999 (0 = no EMA)")
    warmup: bool = doc(False, "ramp the decay up as 1 - (1 + step/warmup_gamma)^-warmup_power")
    warmup_gamma: float = doc(1.0, "warmup: step scale (timm's inv_gamma)")
    warmup_power: float = doc(0.75, "warmup: exponent (3/4 for runs under ~200k updates)")
    eval: bool = doc(True, "also evaluate the EMA weights at each val (logged as split val_ema)")

    def __post_init__(self) -> None:
        check(0 <= self.decay < 1, "ema.decay", "must be in [0, 1)")
        check(self.warmup_gamma > 0, "ema.warmup_gamma", "must be > 0")
        check(self.warmup_power > 0, "ema.warmup_power", "must be > 0")

    @property
    def enabled(self) -> bool:
        """True when an EMA is kept."""
        return self.decay > 0


@dataclass
class TTAConfig:
    """Test-time augmentation: logits averaged over flipped / zoomed views of each eval batch."""

    hflip: bool = doc(True, "add horizontally flipped views (false for text, digits, "
                      "orientation-dependent parts)")
    scales: list[float] = doc([1.0], "zoom factors >= 1: each views the central 1/s of the eval "
                              "crop resized back to image_size (1.0 = the crop itself)")
    at_test: bool = doc(False, "use TTA for the end-of-training test eval (ddp-train eval "
                        "uses it with --tta)")

    def __post_init__(self) -> None:
        check(len(self.scales) >= 1, "tta.scales", "needs at least one scale")
        check(all(s >= 1.0 for s in self.scales), "tta.scales",
              f"{self.scales}: scales must be >= 1 (a zoom-in of the eval crop)")


@dataclass
class CalibrationConfig:
    """Temperature scaling fitted on held-out logits at the end of training."""

    enabled: bool = doc(False, "fit a temperature on the val split after training; stored in "
                        "last's checkpoint and applied to the test eval, eval and predict")
    split: str = doc("", "split the temperature is fitted on ('' = data.val_split)")
    bins: int = doc(15, "equal-width confidence bins of the expected calibration error (ECE)")
    max_iter: int = doc(100, "LBFGS iterations of the one-parameter fit")

    def __post_init__(self) -> None:
        check(self.bins >= 1, "calibration.bins", "must be >= 1")
        check(self.max_iter >= 1, "calibration.max_iter", "must be >= 1")


def check_mixing_loss(loss: LossConfig) -> None:
    """Mixup/cutmix make the targets soft: a per-class loss factor has no class to read."""
    for key, on in (("loss.class_weights", loss.weighted),
                    ("loss.focal_gamma", loss.focal_gamma > 0)):
        check(not on, key, "cannot be combined with mixup/cutmix (timm's "
              "SoftTargetCrossEntropy has no per-class factor); use data.class_balance to "
              "rebalance by sampling instead")


def check_mixing_batch(batch_size: int) -> None:
    """timm's Mixup pairs each sample with the batch reversed."""
    check(batch_size % 2 == 0, "train.batch_size",
          f"{batch_size} is odd; mixup/cutmix pair each sample with the batch reversed and need "
          "an even batch")
