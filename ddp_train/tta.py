"""Test-time augmentation: a model wrapper that averages logits over flipped and zoomed views.

It wraps the forward pass, not the evaluation loop, so :func:`ddp_train.metrics.evaluate` keeps
its exact-once semantics: one batch in, one ``(N, C)`` logits tensor out, every sample counted
once. The views are made on the already transformed batch (the deterministic eval crop), so
they cost no extra decoding. Written here because timm has no TTA wrapper (only test-time
*pooling*, ``timm.layers.TestTimePoolHead``, which changes the head, not the input).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from .config import TTAConfig


def zoom(images: torch.Tensor, scale: float) -> torch.Tensor:
    """The central ``1/scale`` of each ``(N, C, H, W)`` image, resized back to ``H x W``."""
    if scale == 1.0:
        return images
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h / scale)), max(1, round(w / scale))
    # Upsampling only (scale >= 1): bilinear without antialiasing, as an eval resize would.
    return TF.resized_crop(images, (h - ch) // 2, (w - cw) // 2, ch, cw, [h, w],
                           antialias=False)


def _with_image(inputs: Any, image: torch.Tensor) -> Any:
    """``inputs`` with its image replaced: multimodal dicts keep their sensor/env entries."""
    return {**inputs, "image": image} if isinstance(inputs, dict) else image


class TTAModel(nn.Module):
    """``model`` evaluated on every (scale, flip) view of the input; returns the mean logits.

    Views: each scale of ``cfg.scales``, each also mirrored when ``cfg.hflip``. Logits are
    averaged in float32 (under autocast the model may return bf16). Views run one after the
    other, so memory stays that of one batch.
    """

    def __init__(self, model: nn.Module, cfg: TTAConfig) -> None:
        super().__init__()
        self.model = model
        self.scales = list(cfg.scales)
        self.flips = [False, True] if cfg.hflip else [False]
        self.train(model.training)

    @property
    def num_views(self) -> int:
        """Forward passes per batch."""
        return len(self.scales) * len(self.flips)

    def forward(self, inputs: Any) -> torch.Tensor:
        image = inputs["image"] if isinstance(inputs, dict) else inputs
        total = None
        for scale in self.scales:
            view = zoom(image, scale)
            for flip in self.flips:
                logits = self.model(_with_image(inputs, view.flip(-1) if flip else view)).float()
                total = logits if total is None else total + logits
        return total / self.num_views
