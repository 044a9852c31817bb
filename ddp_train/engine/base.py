"""The seam between the training loop and how forward/backward/step run: one process, DDP, DeepSpeed.

The loop drives every engine the same way, once per micro-batch::

    x, y = engine.to_device(x), engine.to_device(y)
    with engine.autocast():
        loss = criterion(engine.model(x), y)
    engine.backward(loss)
    out = engine.step()  # None inside an accumulation window, StepOutput on its last micro-batch

Checkpoints go through ``engine.save_checkpoint(path, client_state, meta)`` and
``engine.load_checkpoint(path)``, called on every rank.

``build_engine`` moves the model to the device (and channels_last), then wraps it (DDP) and
finally compiles it. :class:`~ddp_train.engine_deepspeed.DeepSpeedEngine` subclasses
:class:`Engine` and overrides the wrapping, ``backward``, ``step`` and the checkpoint methods,
since DeepSpeed owns the loss scaling, the accumulation boundary and the (partitioned) optimizer
state. This is the only module that imports DistributedDataParallel.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, ContextManager, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.utils import unwrap_model
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .config import ConfigError, EngineConfig
from .dist import DistInfo, broadcast_tensors

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class StepOutput(NamedTuple):
    """What an optimizer step reports: the pre-clip global grad norm, and whether the update was
    skipped (fp16 overflow, or a non-finite gradient) leaving weights and optimizer untouched."""

    grad_norm: float
    skipped: bool


class Engine:
    """Single-process engine; also the base class that DDP and DeepSpeed specialise."""

    name = "local"
    checkpoint_suffix = ".pt"  # one weights_only-safe file, written by rank 0

    def __init__(self, cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 dist: DistInfo, *, grad_accum: int = 1, clip_grad: float = 0.0,
                 channels_last: bool = False, compile: bool = False) -> None:
        """Wrap (and compile) ``model``, already on ``dist.device``; prefer :func:`build_engine`."""
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        self.cfg = cfg
        self.dist = dist
        self.device = dist.device
        self.precision = cfg.precision
        self.optimizer = optimizer
        self.grad_accum = grad_accum
        self.clip_grad = clip_grad
        self.channels_last = channels_last
        self.micro_step = 0  # micro-batches finished (step() calls) since the engine was built
        self._amp_dtype = _AMP_DTYPES[cfg.precision]
        # Loss scaling only for fp16: bf16 has fp32's exponent range, so its gradients do not
        # underflow. A disabled scaler is a pass-through, which keeps backward/step branch-free.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.model = self._wrap(model, dist)
        # Floating buffers (BatchNorm running stats) as of the last finite step; see step().
        self._buffers = [b for b in self.unwrapped.buffers() if b.is_floating_point()]
        self._good_buffers = [b.detach().clone() for b in self._buffers]
        if compile:
            # Compile after DDP wrapping: dynamo then splits the graph at DDP bucket boundaries so
            # the gradient all-reduce still overlaps the backward pass.
            self.model = torch.compile(self.model)

    def _wrap(self, model: nn.Module, dist: DistInfo) -> nn.Module:
        """Return the module the loop calls; the local engine runs the model as is."""
        return model

    def _no_sync(self) -> ContextManager:
        """Context that suppresses gradient synchronisation; nothing to suppress locally."""
        return contextlib.nullcontext()

    @property
    def unwrapped(self) -> nn.Module:
        """The plain model (no DDP / torch.compile wrapper) for evaluation and saving."""
        return unwrap_model(self.model)

    def sync_buffers(self) -> None:
        """Give every rank rank 0's floating buffers (BatchNorm running stats); all ranks call.

        DDP broadcasts them at the start of each *training* forward, so after the last update
        every rank holds the stats of its own last batch; evaluating then would mix per-rank
        models (the trainer calls this before each eval). One flat broadcast per dtype.
        """
        broadcast_tensors(self.dist, self._buffers)

    @property
    def collective_forward(self) -> bool:
        """True when the bare model's forward runs collectives (every rank must call it)."""
        return False

    @property
    def is_boundary(self) -> bool:
        """True when the current micro-batch is the last of its accumulation window."""
        return (self.micro_step + 1) % self.grad_accum == 0

    def to_device(self, x: Any) -> Any:
        """Move a batch tensor to the engine's device; 4-d image batches go channels_last if set.

        A dict (multimodal inputs ``{"image", "sensor", "env"}``) has each entry moved."""
        if isinstance(x, dict):
            return {k: self.to_device(v) for k, v in x.items()}
        # non_blocking overlaps the host-to-GPU copy with compute when the loader pins memory.
        if self.channels_last and x.dim() == 4:
            return x.to(self.device, non_blocking=True, memory_format=torch.channels_last)
        return x.to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Context for the forward pass: mixed precision, and DDP's no_sync off the boundary."""
        sync = contextlib.nullcontext() if self.is_boundary else self._no_sync()
        amp = (torch.autocast(self.device.type, dtype=self._amp_dtype)
               if self._amp_dtype is not None else contextlib.nullcontext())
        with sync, amp:
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate gradients of ``loss`` (the micro-batch mean) into ``.grad``."""
        # grad_accum micro-batch means, each divided by grad_accum, sum to the mean over the
        # window: the same update as one big batch of grad_accum x batch_size samples.
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self) -> Optional[StepOutput]:
        """Call once per micro-batch; on the accumulation boundary clip, step and zero the grads.

        Returns None off the boundary. The grad norm is read back with ``.item()``: one
        device-to-host sync per optimizer step.
        """
        boundary = self.is_boundary
        self.micro_step += 1
        if not boundary:
            return None
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients before measuring/clipping
        # Under DDP the gradients are already all-reduced (identical on every rank), so this
        # local, sync-free norm is the global norm. The pre-clip norm is returned either way;
        # without clipping only the norm is computed (no extra pass rescaling every gradient).
        params = [p for p in self.unwrapped.parameters() if p.grad is not None]
        if self.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        norm = float(grad_norm)  # the one host sync of the step
        if not self.scaler.is_enabled() and not math.isfinite(norm):
            # fp32/bf16: a NaN/inf gradient would poison weights and optimizer state for good.
            # Skip the update as fp16's scaler does; the norm is post-all-reduce, so every rank
            # skips the same step. The forward pass already moved the BatchNorm running stats
            # towards NaN: put back those of the last good step.
            self.optimizer.zero_grad(set_to_none=True)
            if self._buffers:
                torch._foreach_copy_(self._buffers, self._good_buffers)
            return StepOutput(grad_norm=norm, skipped=True)
        if self._buffers:  # a handful of small tensors (BatchNorm stats): cheap to copy per update
            torch._foreach_copy_(self._good_buffers, self._buffers)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # fp16: skips optimizer.step when a grad is inf/nan
        self.scaler.update()
        skipped = self.scaler.get_scale() < scale  # the scaler backs off only after a skip
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(grad_norm=norm, skipped=skipped)

    def state_dict(self) -> dict[str, Any]:
        """Model (clean keys), optimizer and grad-scaler state; weights_only-safe."""
        return {"model": self.unwrapped.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (model strictly, optimizer, scaler)."""
        self.unwrapped.load_state_dict(state["model"])
        if self._buffers:  # the loaded stats are the last good ones now
            torch._foreach_copy_(self._good_buffers, self._buffers)
        self.optimizer.load_state_dict(state["optimizer"])  # moves its state to the params' device
        if state.get("scaler"):  # empty when saved by a non-fp16 run: keep the fresh scaler
            self.scaler.load_state_dict(state["scaler"])

    def save_checkpoint(self, path: str, client_state: dict[str, Any],
                        meta: dict[str, Any]) -> None:
        """Call on every rank: rank 0 atomically writes :meth:`state_dict` + ``client_state``.

        The state is identical on every rank (same start, all-reduced gradients): one copy.
        """
        if self.dist.is_main:
            ckpt.save_atomic(path, {**self.state_dict(), **client_state}, meta)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load ``path`` into model, optimizer and scaler; return the whole saved dict."""
        state = ckpt.load(path, map_location="cpu")
        self.load_state_dict(state)
        return state


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


def build_engine(cfg: EngineConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 dist: DistInfo, *, batch_size: int = 1, grad_accum: int = 1,
                 clip_grad: float = 0.0, channels_last: bool = False,
                 compile: bool = False) -> Engine:
    """Move ``model`` to ``dist.device``, wrap it per ``cfg.name`` (auto: ddp when distributed).

    ``optimizer`` must already hold ``model``'s parameters; moving the model keeps the same
    Parameter objects, so it stays valid. Load checkpoints into the engine after building it.
    ``batch_size`` (per rank and micro-batch) only matters to DeepSpeed, whose config needs it.
    """
    name = cfg.name if cfg.name != "auto" else ("ddp" if dist.distributed else "local")
    if name == "ddp" and not dist.distributed:
        raise ConfigError("engine.name: ddp needs a process group: launch with torchrun "
                          "--nproc_per_node>1 (or use engine.name=auto/local)")
    if dist.device.type == "cuda":
        # Fixed input size: cuDNN benchmarks conv algorithms on the first batch and reuses the
        # fastest for every later step.
        torch.backends.cudnn.benchmark = True
    if cfg.precision == "fp16" and dist.device.type == "cpu":
        warnings.warn("engine.precision=fp16 on CPU works but is slow; use bf16 or fp32 on CPU",
                      stacklevel=2)
    memory_format = torch.channels_last if channels_last else torch.preserve_format
    model = model.to(dist.device, memory_format=memory_format)
    kwargs: dict[str, Any] = dict(grad_accum=grad_accum, clip_grad=clip_grad,
                                  channels_last=channels_last, compile=compile)
    if name == "deepspeed":
        from .engine_deepspeed import DeepSpeedEngine  # lazy: deepspeed is an optional extra

        return DeepSpeedEngine(cfg, model, optimizer, dist, batch_size=batch_size, **kwargs)
    engine_cls = DDPEngine if name == "ddp" else Engine
    return engine_cls(cfg, model, optimizer, dist, **kwargs)
