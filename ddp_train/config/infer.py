"""Config sections for inference-time recipes (TTA, temperature calibration) and the multimodal
FiLM model. Kept apart from ``sections.py``; :class:`~ddp_train.config.sections.Config` only
holds one field per section.
"""
from __future__ import annotations

from dataclasses import dataclass

from .sections import check, doc, one_of

ABLATIONS = ("none", "image_only", "sensor_only", "no_film")


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


@dataclass
class MultimodalConfig:
    """Image + sensor window + environment features: the FiLM fusion model (models/film.py)."""

    enabled: bool = doc(False, "build the fusion model around model.name (needs data.extras: "
                        "[sensor, env]); batches are dicts {image, sensor, env}")
    ablation: str = doc("none", "none, image_only, sensor_only or no_film (env features "
                        "concatenated instead of FiLM)")
    sensor_encoder: str = doc("conv", "sensor window encoder: conv (1-D convs over time) or mlp")
    sensor_dim: int = doc(64, "sensor encoder output features")
    fusion_dim: int = doc(128, "width of the fused features FiLM modulates")
    env_hidden: int = doc(32, "hidden width of the env MLP that computes FiLM scale/shift")
    dropout: float = doc(0.1, "dropout before the classifier")

    def __post_init__(self) -> None:
        one_of(self.ablation, "multimodal.ablation", ABLATIONS)
        one_of(self.sensor_encoder, "multimodal.sensor_encoder", ("conv", "mlp"))
        for key in ("sensor_dim", "fusion_dim", "env_hidden"):
            check(getattr(self, key) >= 1, f"multimodal.{key}", "must be >= 1")
        check(0 <= self.dropout < 1, "multimodal.dropout", "must be in [0, 1)")
