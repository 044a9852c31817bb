"""Where a run's checkpoints live: last, step_XXXXXXXX and best in ``<run>/checkpoints/``.

:class:`CheckpointManager` names them, checks the disk has room, prunes old step checkpoints and
picks one to resume from. What goes into a checkpoint is the caller's (``capture`` in
``state.py``) and how it is written the engine's (``Engine.save_checkpoint``).
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Any, Callable, Optional

from ..config import CheckpointConfig
from ..dist import DistInfo, broadcast_object
from .files import (BEST, LAST, TMP_SUFFIX, loadable, read_meta, recover_folder_swaps,
                    save_atomic)

MIN_FREE_BYTES = 64 * 2**20  # keep this much free beyond the checkpoint itself (logs, OS)


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

    def save_best(self, state: dict[str, Any], meta: dict[str, Any], *, step: int,
                  epoch: int) -> Optional[str]:
        """Write best; returns its path on rank 0, None elsewhere."""
        error = broadcast_object(self.dist, self._space_error(1) if self.dist.is_main else None)
        if error:
            raise OSError(error)
        self._write(self._ckpt(BEST), state, self._meta(meta, step, epoch))
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
