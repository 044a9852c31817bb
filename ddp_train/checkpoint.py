"""Atomic, self-describing checkpoints in ``<run>/checkpoints/``.

Each ``X.pt`` is a ``torch.save`` of a dict holding only tensors, numbers, strings, lists, tuples,
dicts and None, so it loads with ``torch.load(weights_only=True)``; its ``"model"`` key is the
plain model state dict, so ``timm.create_model(name, num_classes=N, checkpoint_path="X.pt")``
loads it directly. Next to it, ``X.pt.json`` describes it (step, epoch, config hash, ...) without
unpickling anything. Both are written to a temp file, fsynced and renamed over the target: a kill
at any moment leaves either the old or the new complete file, never a torn one.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import tempfile
import time
import warnings
from typing import IO, Any, Callable, Optional

import numpy as np
import torch

from .config import CheckpointConfig
from .dist import DistInfo, broadcast_object

FORMAT = "ddp_train.checkpoint/1"
LAST, BEST = "last.pt", "best.pt"
_TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, not weights_only)."""


def config_hash(obj: Any) -> str:
    """First 12 hex chars of the sha256 of ``obj`` (dataclass or JSON-able) dumped canonically."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    # Sorted keys and fixed separators: equal configs hash equal whatever their key order.
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _fsync_dir(directory: str) -> None:
    # A rename is only durable once the directory entry itself reaches the disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` via a temp file in its folder, fsync, rename over it, fsync the folder."""
    directory = os.path.dirname(os.path.abspath(path))
    # Same folder = same filesystem, which is what makes os.replace an atomic rename.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_atomic(path: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically write ``state`` to ``path``, then its JSON sidecar ``<path>.json``.

    The sidecar holds ``meta`` (callers pass step, epoch, config_hash, model_name, num_classes,
    world_size) plus ``format``, ``time``, the file ``size`` and the state's ``keys``. It is
    written second: a kill between the two leaves the new .pt with the previous sidecar, which
    at worst ranks that file one save too old in ``resume='auto'``; it never points at a torn file.
    """
    _atomic_write(path, lambda f: torch.save(state, f))
    sidecar = {"format": FORMAT, "time": time.time(), **meta, "size": os.path.getsize(path),
               "keys": sorted(state)}
    text = json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(path + ".json", lambda f: f.write(text.encode()))


def read_meta(path: str) -> Optional[dict[str, Any]]:
    """The sidecar of checkpoint ``path`` as a dict, or None when missing or unreadable."""
    try:
        with open(path + ".json", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load(path: str, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no arbitrary code runs while unpickling).

    Raises FileNotFoundError when ``path`` is missing and :class:`CheckpointError` when it cannot
    be read back.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises OSError, RuntimeError, EOFError, ValueError, ... here
        raise CheckpointError(f"cannot load checkpoint {path} (truncated, corrupt or not "
                              f"weights_only-safe): {type(e).__name__}: {e}") from e


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (+ CUDA) RNG states in weights_only-safe types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),  # (version, tuple of ints, None): safe as is
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                  "gauss": gauss},  # the uint32 ndarray becomes a list of ints
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states captured by :func:`rng_state` (CUDA only when saved and present)."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Writes last.pt / step_XXXXXXXX.pt / best.pt in ``directory`` and finds one to resume from.

    Only rank 0 writes: under DDP the model, optimizer and scaler state are identical on every
    rank (same initial weights, all-reduced gradients), so one copy describes the whole job.
    """

    def __init__(self, cfg: CheckpointConfig, directory: str, dist: DistInfo) -> None:
        """``directory`` is the checkpoints folder itself (``<run>/checkpoints``)."""
        self.cfg = cfg
        self.directory = directory
        self.dist = dist
        if dist.is_main:
            os.makedirs(directory, exist_ok=True)
            # Temp files of a save that was killed midway: never renamed, safe to drop.
            for tmp in glob.glob(os.path.join(directory, f".*{_TMP_SUFFIX}")):
                os.remove(tmp)

    def path(self, name: str) -> str:
        """Absolute path of checkpoint file ``name`` in this manager's folder."""
        return os.path.join(self.directory, name)

    def _meta(self, meta: dict[str, Any], step: Any, epoch: Any) -> dict[str, Any]:
        return {**meta, "step": step, "epoch": epoch, "world_size": self.dist.world_size}

    def save(self, state: dict[str, Any], meta: dict[str, Any], *, step: int, epoch: int,
             periodic: bool) -> Optional[str]:
        """Write last.pt (and step_XXXXXXXX.pt when ``periodic`` and keep_last > 0) on rank 0.

        Returns the last.pt path on rank 0, None elsewhere. Other ranks return at once; add a
        barrier in the caller if they must not run ahead of the write.
        """
        if not self.dist.is_main:
            return None
        meta = self._meta(meta, step, epoch)
        if periodic and self.cfg.keep_last > 0:
            save_atomic(self.path(f"step_{step:08d}.pt"), state, meta)
            self._prune()
        save_atomic(self.path(LAST), state, meta)
        return self.path(LAST)

    def save_best(self, state: dict[str, Any], meta: dict[str, Any]) -> Optional[str]:
        """Write best.pt on rank 0 (step/epoch in its sidecar come from ``state``)."""
        if not self.dist.is_main:
            return None
        save_atomic(self.path(BEST), state, self._meta(meta, state.get("step"), state.get("epoch")))
        return self.path(BEST)

    def _step_files(self) -> list[str]:
        # Zero-padded steps: name order is step order.
        return sorted(glob.glob(os.path.join(self.directory, "step_" + "[0-9]" * 8 + ".pt")))

    def _prune(self) -> None:
        """Delete all but the newest keep_last step files (and their sidecars)."""
        for path in self._step_files()[:-self.cfg.keep_last]:
            for p in (path, path + ".json"):
                if os.path.exists(p):
                    os.remove(p)

    def _newest_loadable(self) -> Optional[str]:
        """The loadable last.pt / step file with the highest sidecar step, or None."""
        candidates = [p for p in [self.path(LAST), *self._step_files()] if os.path.isfile(p)]
        # Stable sort: on equal steps last.pt (listed first) wins. No sidecar ranks last.
        candidates.sort(key=lambda p: (read_meta(p) or {}).get("step", -1), reverse=True)
        for path in candidates:
            try:
                load(path)  # really unpickle it: only a full load proves it is not torn
            except CheckpointError as e:
                warnings.warn(f"resume=auto: skipping {path}, falling back to an older "
                              f"checkpoint: {e}", stacklevel=3)
                continue
            return path
        return None

    def resume_path(self, resume: str) -> Optional[str]:
        """Checkpoint to resume from: '' -> None, 'auto' -> newest loadable (or None), else a path.

        Collective under DDP for 'auto': rank 0 picks and broadcasts, so every rank resumes from
        the same file even if another one lands meanwhile. An explicit path must exist.
        """
        if not resume:
            return None
        if resume != "auto":
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"run.resume={resume!r}: no such checkpoint file")
            return resume
        return broadcast_object(self.dist, self._newest_loadable() if self.dist.is_main else None)
