"""Atomic, self-describing checkpoints in ``<run>/checkpoints/``.

Each ``X.pt`` is a ``torch.save`` of a dict holding only tensors, numbers, strings, lists, tuples,
dicts and None, so it loads with ``torch.load(weights_only=True)``; its ``"model"`` key is the
plain model state dict, so ``timm.create_model(name, num_classes=N, checkpoint_path="X.pt")``
loads it directly. Next to it, ``X.pt.json`` describes it (step, epoch, config hash, ...) without
unpickling anything. Both are written to a temp file, fsynced and renamed over the target: a kill
at any moment leaves either the old or the new complete file, never a torn one.

The engine writes and reads a checkpoint (``Engine.save_checkpoint`` / ``load_checkpoint``); this
module names them, prunes them and picks one to resume from. A DeepSpeed checkpoint is a folder
``X/`` (one file per rank's partition) with the same ``X.json`` sidecar, which lists its files.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
import warnings
from typing import IO, Any, Callable, Optional

import numpy as np
import torch

from .config import CheckpointConfig
from .dist import DistInfo, broadcast_object

FORMAT = "ddp_train.checkpoint/1"
LAST, BEST = "last", "best"  # + the engine's suffix (".pt", or "" for a folder)
TMP_SUFFIX = ".tmp"
MIN_FREE_BYTES = 64 * 2**20  # keep this much free beyond the checkpoint itself (logs, OS)


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
                               suffix=TMP_SUFFIX)
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
    write_sidecar(path, meta, keys=sorted(state))


def write_sidecar(path: str, meta: dict[str, Any], keys: list[str]) -> None:
    """Atomically write ``<path>.json``: ``meta`` + format, time, size (file) or files (folder).

    For a checkpoint folder the sidecar records every file's size: written after the folder is
    complete, it is what :func:`loadable` checks instead of unpickling every partition.
    """
    if os.path.isdir(path):
        found = {os.path.relpath(os.path.join(d, f), path): os.path.getsize(os.path.join(d, f))
                 for d, _, files in os.walk(path) for f in files}
        size: dict[str, Any] = {"size": sum(found.values()), "files": found}
    else:
        size = {"size": os.path.getsize(path)}
    sidecar = {"format": FORMAT, "time": time.time(), **meta, **size, "keys": keys}
    text = json.dumps(sidecar, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(path + ".json", lambda f: f.write(text.encode()))


OLD = ".old"  # a folder checkpoint being replaced: .X.old/ and .X.old.json until the swap ends


def replace_folder(tmp: str, path: str, meta: dict[str, Any], keys: list[str]) -> None:
    """Swap the complete checkpoint folder ``tmp`` in as ``path`` (rank 0; DeepSpeed folders).

    A folder cannot be renamed over another one atomically, so the previous folder and its
    sidecar step aside as ``.X.old`` first and are deleted only once the new sidecar is written.
    Whatever step a kill interrupts, :func:`recover_folder_swaps` finds either the new folder
    with its sidecar or the previous one with its own, never a folder with a foreign sidecar.
    """
    parent, name = os.path.split(path)
    old = os.path.join(parent, f".{name}{OLD}")
    if os.path.isdir(path):
        if os.path.exists(path + ".json"):
            os.replace(path + ".json", old + ".json")  # (1) the old folder stops being a candidate
        os.replace(path, old)  # (2)
    os.replace(tmp, path)  # (3) the new folder, not yet described
    write_sidecar(path, meta, keys)  # (4) the new folder becomes the checkpoint
    shutil.rmtree(old, ignore_errors=True)  # (5)
    if os.path.exists(old + ".json"):
        os.remove(old + ".json")
    _fsync_dir(parent)


def recover_folder_swaps(directory: str) -> None:
    """Finish or undo a :func:`replace_folder` that a kill interrupted (rank 0, before resume)."""
    for old_json in glob.glob(os.path.join(directory, f".*{OLD}.json")):
        old = old_json[:-len(".json")]
        path = os.path.join(directory, os.path.basename(old)[1:-len(OLD)])
        if os.path.exists(path + ".json"):  # killed in (5): the new checkpoint is complete
            shutil.rmtree(old, ignore_errors=True)
        elif os.path.isdir(old):  # killed after (2), before (4): put the previous one back
            shutil.rmtree(path, ignore_errors=True)
            os.replace(old, path)
            os.replace(old_json, path + ".json")
        else:  # killed between (1) and (2): the previous folder is still in place
            os.replace(old_json, path + ".json")
        if os.path.exists(old_json):
            os.remove(old_json)
    for old in glob.glob(os.path.join(directory, f".*{OLD}")):  # (5) half done: no sidecar
        shutil.rmtree(old, ignore_errors=True)


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


def loadable(path: str) -> bool:
    """True when checkpoint ``path`` is complete: a file unpickles, a folder matches its sidecar."""
    if os.path.isdir(path):
        files = (read_meta(path) or {}).get("files")
        return bool(files) and all(
            os.path.isfile(os.path.join(path, f)) and os.path.getsize(os.path.join(path, f)) == n
            for f, n in files.items())
    try:
        load(path)  # really unpickle it: only a full load proves it is not torn
    except (CheckpointError, FileNotFoundError) as e:
        warnings.warn(f"resume=auto: skipping {path}, falling back to an older "
                      f"checkpoint: {e}", stacklevel=3)
        return False
    return True


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
    """Writes last / step_XXXXXXXX / best checkpoints in ``directory``; finds one to resume from.

    ``write(path, state, meta)`` writes one checkpoint and is called on every rank: the engine's
    ``save_checkpoint`` (DeepSpeed needs every rank, each saving its partition). The default
    writes ``state`` atomically on rank 0 only: under DDP the model, optimizer and scaler state
    are identical on every rank, so one copy describes the whole job. ``suffix`` is the
    engine's ``checkpoint_suffix`` (".pt" files, "" for DeepSpeed folders).
    """

    def __init__(self, cfg: CheckpointConfig, directory: str, dist: DistInfo, *,
                 suffix: str = ".pt",
                 write: Optional[Callable[[str, dict, dict], None]] = None) -> None:
        """``directory`` is the checkpoints folder itself (``<run>/checkpoints``)."""
        self.cfg = cfg
        self.directory = directory
        self.dist = dist
        self.suffix = suffix
        self._write = write or self._write_on_main
        if dist.is_main:
            os.makedirs(directory, exist_ok=True)
            recover_folder_swaps(directory)
            # Temp files / folders of a save that was killed midway: never renamed, safe to drop.
            for tmp in glob.glob(os.path.join(directory, f".*{TMP_SUFFIX}")):
                shutil.rmtree(tmp) if os.path.isdir(tmp) else os.remove(tmp)

    def _write_on_main(self, path: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
        if self.dist.is_main:
            save_atomic(path, state, meta)

    def path(self, name: str) -> str:
        """Absolute path of file or folder ``name`` in this manager's folder."""
        return os.path.join(self.directory, name)

    def _ckpt(self, name: str) -> str:
        """Path of checkpoint ``name`` (last, best, step_XXXXXXXX) with the engine's suffix."""
        return self.path(name + self.suffix)

    def _meta(self, meta: dict[str, Any], step: Any, epoch: Any) -> dict[str, Any]:
        return {**meta, "step": step, "epoch": epoch, "world_size": self.dist.world_size}

    def save(self, state: dict[str, Any], meta: dict[str, Any], *, step: int, epoch: int,
             periodic: bool) -> Optional[str]:
        """Write last (and step_XXXXXXXX when ``periodic`` and keep_last > 0).

        Returns the path of last on rank 0, None elsewhere. With the default writer other ranks
        return at once; add a barrier in the caller if they must not run ahead of the write.
        """
        meta = self._meta(meta, step, epoch)
        snapshot = periodic and self.cfg.keep_last > 0
        # Decided on rank 0 and broadcast: with DeepSpeed every rank writes, and a rank that
        # skipped the save while the others entered DeepSpeed's barriers would hang them.
        error = broadcast_object(self.dist, self._space_error(2 if snapshot else 1)
                                 if self.dist.is_main else None)
        if error:
            raise OSError(error)
        if snapshot:
            self._write(self._ckpt(f"step_{step:08d}"), state, meta)
            if self.dist.is_main:
                self._prune()
        self._write(self._ckpt(LAST), state, meta)
        return self._ckpt(LAST) if self.dist.is_main else None

    def _space_error(self, copies: int) -> Optional[str]:
        """Why ``copies`` more checkpoints would not fit on the disk, or None when they would.

        The size of a checkpoint is taken from last's sidecar (the first save assumes only the
        safety margin): the temp file and the old file coexist until the rename, so each copy
        needs its full size free.
        """
        previous = int((read_meta(self._ckpt(LAST)) or {}).get("size") or 0)
        need = copies * previous * 1.05 + MIN_FREE_BYTES
        free = shutil.disk_usage(self.directory).free
        if free < need:
            return (f"not enough free disk in {self.directory}: {free / 2**30:.2f} GiB free, "
                    f"{need / 2**30:.2f} GiB needed for {copies} checkpoint(s)")
        return None

    def save_best(self, state: dict[str, Any], meta: dict[str, Any]) -> Optional[str]:
        """Write best (step/epoch in its sidecar come from ``state``); path on rank 0."""
        error = broadcast_object(self.dist, self._space_error(1) if self.dist.is_main else None)
        if error:
            raise OSError(error)
        self._write(self._ckpt(BEST), state, self._meta(meta, state.get("step"),
                                                       state.get("epoch")))
        return self._ckpt(BEST) if self.dist.is_main else None

    def _step_files(self) -> list[str]:
        # Zero-padded steps: name order is step order.
        return sorted(glob.glob(self._ckpt("step_" + "[0-9]" * 8)))

    def _prune(self) -> None:
        """Delete all but the newest keep_last step checkpoints (and their sidecars)."""
        for path in self._step_files()[:-self.cfg.keep_last]:
            if os.path.exists(path + ".json"):
                os.remove(path + ".json")  # first: a folder without sidecar is never resumed
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)

    def _newest_loadable(self) -> Optional[str]:
        """The loadable last / step checkpoint with the highest sidecar step, or None."""
        candidates = [p for p in [self._ckpt(LAST), *self._step_files()] if os.path.exists(p)]
        # Stable sort: on equal steps last (listed first) wins. No sidecar ranks last.
        candidates.sort(key=lambda p: (read_meta(p) or {}).get("step", -1), reverse=True)
        return next((p for p in candidates if loadable(p)), None)

    def resume_path(self, resume: str) -> Optional[str]:
        """Checkpoint to resume from: '' -> None, 'auto' -> newest loadable (or None), else a path.

        Collective under DDP for 'auto': rank 0 picks and broadcasts, so every rank resumes from
        the same file even if another one lands meanwhile. An explicit path must exist.
        """
        if not resume:
            return None
        if resume != "auto":
            if not os.path.exists(resume):
                raise FileNotFoundError(f"run.resume={resume!r}: no such checkpoint")
            return resume
        return broadcast_object(self.dist, self._newest_loadable() if self.dist.is_main else None)
