"""DistributedDataParallel: gradients are averaged over ranks during backward.

This is the only module that imports DistributedDataParallel.
"""
from __future__ import annotations

from typing import ContextManager

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..dist import DistInfo
from .base import Engine


class DDPEngine(Engine):
    """DistributedDataParallel: gradients are averaged over ranks during backward."""

    name = "ddp"

    def _wrap(self, model: nn.Module, dist: DistInfo) -> nn.Module:
        # DDP broadcasts rank 0's parameters and buffers here, so all ranks start identical.
        self._ddp = DistributedDataParallel(
            model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None,
            find_unused_parameters=self.cfg.find_unused_parameters,
            gradient_as_bucket_view=True)  # grads live in the all-reduce buckets: no extra copy
        return self._ddp

    def _no_sync(self) -> ContextManager:
        # Off the boundary skip the gradient all-reduce: grads accumulate locally and the
        # boundary micro-batch all-reduces the accumulated sum once. DDP decides at *forward*
        # time whether the following backward syncs, so this wraps the forward (autocast()),
        # not backward(): a no_sync around backward alone would still all-reduce.
        return self._ddp.no_sync()
