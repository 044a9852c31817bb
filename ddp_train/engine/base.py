"""The engine interface, and the single-process engine that implements it.

The loop drives every engine the same way, once per micro-batch::

    x, y = engine.to_device(x), engine.to_device(y)
    with engine.autocast():
        loss = criterion(engine.model(x), y)
    engine.backward(loss)
    out = engine.step()  # None inside an accumulation window, StepOutput on its last micro-batch

Besides that the engine answers what the trainer would otherwise have to ask the wrapped model
or the engine config: mixed precision for evaluation (:meth:`Engine.eval_autocast`), whether each
rank holds whole weights (:attr:`Engine.replicated_weights`, which an EMA needs), whether the
bare model's forward is collective (ZeRO-3), and how to write and read a checkpoint
(:meth:`Engine.save_checkpoint` / :meth:`Engine.load_checkpoint`, called on every rank).

:class:`Engine` is the one-process engine; ``ddp.py`` and ``deepspeed.py`` subclass it and
override the wrapping (and DeepSpeed also ``backward``, ``step`` and the checkpoint methods).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager, Iterator, NamedTuple, Optional

import torch
import torch.nn as nn
from timm.utils import unwrap_model

from .. import checkpoint as ckpt
from ..config import EngineConfig
from ..dist import DistInfo, broadcast_tensors

_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# What a .pt checkpoint holds for the engine itself; the rest of the file is the client state.
ENGINE_KEYS = ("model", "optimizer", "scaler")


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
                 dist: DistInfo, *, batch_size: int = 1, grad_accum: int = 1,
                 clip_grad: float = 0.0, channels_last: bool = False,
                 compile: bool = False) -> None:
        """Wrap (and compile) ``model``, already on ``dist.device``; prefer ``build_engine``.

        ``batch_size`` (per rank and micro-batch) is unused here; DeepSpeed's config needs it.
        """
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
    def replicated_weights(self) -> bool:
        """True when every rank holds the whole model (what an EMA of the weights needs)."""
        return True

    def eval_autocast(self) -> ContextManager:
        """Mixed precision for evaluation: the training precision, without DDP's no_sync."""
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

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
        with sync, self.eval_autocast():
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
        """Call on every rank: rank 0 atomically writes :meth:`state_dict` + ``client_state``
        (whose keys must not be :data:`ENGINE_KEYS`).

        The state is identical on every rank (same start, all-reduced gradients): one copy.
        """
        if self.dist.is_main:
            ckpt.save_atomic(path, {**self.state_dict(), **client_state}, meta)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Load ``path`` into model, optimizer and scaler; return the rest (the client state)."""
        state = ckpt.load(path, map_location="cpu")
        self.load_state_dict(state)
        return {k: v for k, v in state.items() if k not in ENGINE_KEYS}
