"""DeepSpeed (ZeRO 0-3, offload) behind the same seam as DDP: the training loop does not change.

What stays ddp-train's: the batch sizes, accumulation, clipping and precision (``train.*`` and
``engine.precision`` are written into DeepSpeed's config; a conflicting value in
``engine.deepspeed`` is a :class:`ConfigError`), the timm optimizer (passed to DeepSpeed as a
client optimizer) and the timm LR schedule (it sets ``lr`` on the optimizer's param groups every
update, as under DDP), so loss curves are comparable across engines. What DeepSpeed owns: the
gradient reduction and partitioning, loss scaling, the accumulation boundary and the checkpoint
files. This is the only module that imports deepspeed, and only when the engine is built.
"""
from __future__ import annotations

import copy
import importlib
import os
from typing import Any, Optional

import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..config import ConfigError
from ..dist import DistInfo, barrier
from .base import Engine, StepOutput

# ddp-train keys -> DeepSpeed keys it sets (for the error message naming both).
_OWNED = {"train_micro_batch_size_per_gpu": "train.batch_size",
          "gradient_accumulation_steps": "train.grad_accum",
          "train_batch_size": "train.batch_size x train.grad_accum x world size",
          "gradient_clipping": "train.clip_grad"}
_FORBIDDEN = {"optimizer": "optim.*", "scheduler": "schedule.*"}


def deepspeed_config(block: dict, *, batch_size: int, grad_accum: int, clip_grad: float,
                     precision: str, world_size: int) -> dict:
    """DeepSpeed's config: ``block`` (``engine.deepspeed``) plus the values ddp-train owns.

    One source of truth: a key of ``block`` that ddp-train also sets must hold the same value,
    else a ConfigError names both keys.
    """
    ds = copy.deepcopy(block)
    for key, owner in _FORBIDDEN.items():
        if key in ds:
            raise ConfigError(f"engine.deepspeed.{key}: ddp-train builds the {key} from {owner} "
                              f"(timm) so curves match across engines; remove it")
    owned = {"train_micro_batch_size_per_gpu": batch_size,
             "gradient_accumulation_steps": grad_accum,
             "train_batch_size": batch_size * grad_accum * world_size,
             "gradient_clipping": float(clip_grad)}
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"engine.deepspeed.{key}={ds[key]!r} conflicts with "
                              f"{_OWNED[key]} (= {value}); remove it from engine.deepspeed")
        ds[key] = value
    for mode in ("bf16", "fp16"):
        section = ds.get(mode, {})
        enabled = precision == mode
        if "enabled" in section and bool(section["enabled"]) != enabled:
            raise ConfigError(f"engine.deepspeed.{mode}.enabled={section['enabled']!r} conflicts "
                              f"with engine.precision (= {precision}); remove it from "
                              f"engine.deepspeed")
        ds[mode] = {**section, "enabled": enabled}
    # The optimizer is timm's by design (lamb, lars, ... as well as AdamW): ZeRO only vouches for
    # a short list of optimizer classes and otherwise refuses to start.
    ds.setdefault("zero_allow_untested_optimizer", True)
    # Same reason with optimizer offload: ZeRO-Offload refuses a client optimizer unless told
    # otherwise. The timm optimizer then steps the offloaded fp32 states on the CPU in plain
    # torch: same results as without offload (tests), slower than DeepSpeedCPUAdam, which would
    # need a C++ build and exists for Adam only.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 2**31 - 1)  # ddp-train logs steps itself
    return ds


def _skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-compiling its shared-memory comm extension on CPU runs.

    On the CPU accelerator ``deepspeed.comm.torch.TorchBackend`` calls ``build_shm_op()`` when it
    wraps the process group; that compiles a C++ extension (~50 s on a fresh machine, cached in
    ~/.cache/torch_extensions) only to speed up intra-node CPU all-reduce. Collectives then go
    through gloo, which is what DDP uses on CPU too. GPU runs never reach this code path.
    """
    # importlib: ``import deepspeed.comm.torch as m`` binds the top-level ``torch`` package
    # (deepspeed.comm re-exports it), not the submodule whose attribute we replace.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None


def _cast_batchnorm_stats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast BatchNorm running mean/var to ``dtype`` (DeepSpeed's bf16/fp16 casts params only).

    Without it a BatchNorm layer (resnet, efficientnet) meets bf16 activations and weights but
    fp32 running stats and fails ("expected scalar type BFloat16 but found Float"). Only these
    buffers: DeepSpeed's blanket ``data_types.buffer_dtype`` would also cast buffers that must
    stay fp32 (e.g. rotary frequencies). num_batches_tracked stays an integer.
    """
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.running_mean.data = module.running_mean.data.to(dtype)
            module.running_var.data = module.running_var.data.to(dtype)


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` around the model and ddp-train's optimizer; ZeRO stage from
    ``engine.deepspeed.zero_optimization.stage`` (0 = plain data parallel)."""

    name = "deepspeed"
    checkpoint_suffix = ""  # a DeepSpeed checkpoint is a folder: one file per rank's partition

    def __init__(self, cfg, model, optimizer, dist, *, batch_size: int = 1, grad_accum: int = 1,
                 clip_grad: float = 0.0, channels_last: bool = False,
                 compile: bool = False) -> None:
        """``deepspeed.initialize`` with the config :func:`deepspeed_config` derives."""
        # Checked before deepspeed starts: a config conflict costs nothing.
        self.ds_config = deepspeed_config(cfg.deepspeed, batch_size=batch_size,
                                          grad_accum=grad_accum, clip_grad=clip_grad,
                                          precision=cfg.precision, world_size=dist.world_size)
        if dist.launcher == "python":
            raise ConfigError("engine.name: deepspeed needs a launcher, even for one process "
                              "(torchrun, deepspeed or accelerate launch)")
        self._client_optimizer = optimizer
        super().__init__(cfg, model, optimizer, dist, batch_size=batch_size,
                         grad_accum=grad_accum, clip_grad=clip_grad,
                         channels_last=channels_last, compile=compile)
        # DeepSpeed scales fp16 losses itself; ddp-train's GradScaler stays disabled.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        # The optimizer DeepSpeed steps (ZeRO wraps the client one). Its param_groups are the
        # client's group dicts, so the timm schedule setting group["lr"] reaches every update.
        self.optimizer = self._ds.optimizer

    @property
    def collective_forward(self) -> bool:
        """ZeRO-3 partitions the weights: each forward all-gathers them layer by layer."""
        return self._ds.zero_optimization_stage() == 3

    @property
    def replicated_weights(self) -> bool:
        """False under ZeRO-3: each rank holds only a slice of every parameter."""
        return self._ds.zero_optimization_stage() < 3

    def _wrap(self, model: nn.Module, dist: DistInfo) -> nn.Module:
        import deepspeed  # lazy: DDP users need not install deepspeed

        if dist.device.type == "cpu":
            _skip_shm_comm_build()
        if self.precision != "fp32":
            _cast_batchnorm_stats(model, self._amp_dtype)
        # dist.setup already started the process group (world > 1); DeepSpeed adopts it.
        # A one-process launch has none, and DeepSpeed starts it from the launcher's env vars.
        self._ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self._client_optimizer,
                                                 config=self.ds_config)
        return self._ds

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps and applies the fp16 loss scale.
        self._ds.backward(loss)

    def step(self) -> Optional[StepOutput]:
        """DeepSpeed steps only on the accumulation boundary (it counts micro-batches too)."""
        boundary = self._ds.is_gradient_accumulation_boundary()
        norm = None
        if boundary and self._ds.zero_optimization_stage() == 0 and self.precision == "fp32":
            # Plain fp32 data parallel keeps full, already all-reduced grads in .grad but does
            # not report their norm; measure it (pre-clip) before DeepSpeed clips and steps.
            norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.unwrapped.parameters() if p.grad is not None]).item()
        skipped_before = self._ds.skipped_steps
        self._ds.step()
        self.micro_step += 1
        if not boundary:
            return None
        # DeepSpeed does not broadcast buffers (DDP does, in every forward), so each rank's
        # running stats would follow only its own batches: evaluation would mix per-rank
        # models, and a resume (DeepSpeed saves rank 0's module) would not continue the other
        # ranks exactly. One flat broadcast per dtype and update.
        self.sync_buffers()
        if norm is None:  # ZeRO / mixed precision: the optimizer measured the global norm
            norm = float(self._ds.get_global_grad_norm())
        return StepOutput(grad_norm=norm, skipped=self._ds.skipped_steps > skipped_before)

    def save_checkpoint(self, path: str, client_state: dict, meta: dict) -> None:
        """All ranks: DeepSpeed writes folder ``path`` (model, optimizer, ``client_state``).

        DeepSpeed overwrites files in place, so it writes a temp folder that rank 0 then swaps in
        over ``path`` (:func:`checkpoint.replace_folder`); the JSON sidecar, written last, lists
        the files and their sizes and is what makes the folder a resume candidate. A kill at any
        point leaves the previous or the new checkpoint, each with its own sidecar.
        """
        parent, name = os.path.split(path)
        tmp = f".{name}{ckpt.TMP_SUFFIX}"
        self._ds.save_checkpoint(parent, tag=tmp, client_state=client_state, save_latest=False)
        barrier(self.dist)  # every rank's partition is on disk before the swap
        if self.dist.is_main:
            ckpt.replace_folder(os.path.join(parent, tmp), path, meta, keys=sorted(client_state))
        barrier(self.dist)  # nobody loads or prunes before the sidecar exists

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """All ranks: load folder ``path`` (weights, optimizer, scaler); returns the client state.

        DeepSpeed hands back its own bookkeeping (ds_config, param_shapes, ...) mixed into the
        client state; the sidecar lists the keys ddp-train saved, and only those are returned.
        """
        parent, tag = os.path.split(os.path.abspath(path))
        keys = (ckpt.read_meta(path) or {}).get("keys")
        if keys is None:
            raise ckpt.CheckpointError(f"DeepSpeed checkpoint {path} has no sidecar listing its "
                                       f"entries ({path}.json)")
        loaded, client_state = self._ds.load_checkpoint(parent, tag=tag,
                                                        load_lr_scheduler_states=False)
        if loaded is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        return {k: client_state[k] for k in keys if k in client_state}
