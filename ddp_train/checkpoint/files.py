"""Checkpoint files: atomic writes, JSON sidecars, folder swaps, and verified loading.

Each ``X.pt`` is a ``torch.save`` of a dict holding only tensors, numbers, strings, lists, tuples,
dicts and None, so it loads with ``torch.load(weights_only=True)``; its ``"model"`` key is the
plain model state dict, so ``timm.create_model(name, num_classes=N, checkpoint_path="X.pt")``
loads it directly. Next to it, ``X.pt.json`` describes it (step, epoch, config, ...) without
unpickling anything. Both are written to a temp file, fsynced and renamed over the target: a kill
at any moment leaves either the old or the new complete file, never a torn one. A DeepSpeed
checkpoint is a folder ``X/`` (one file per rank's partition) with the same ``X.json`` sidecar,
which lists its files; :func:`loadable` verifies either kind.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import time
import warnings
from typing import IO, Any, Callable, Optional

import torch

# /2: one client-state entry per stateful part, each read back (checkpoint/state.py); /1 loads.
FORMAT = "ddp_train.checkpoint/2"
LAST, BEST = "last", "best"  # + the engine's suffix (".pt", or "" for a folder)
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be loaded (truncated, corrupt, not weights_only)."""


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


