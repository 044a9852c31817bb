"""What a checkpoint holds besides the engine's own state, and how it goes back in.

The trainer names its stateful parts once, in one mapping ``{name: part}`` (scheduler, loader,
EMA, RNGs, ...; each with ``state_dict()`` / ``load_state_dict()``). :func:`capture` turns the
mapping into the checkpoint's client state and :func:`restore` loads a client state back into
the same mapping, refusing one whose entries do not match it: every saved entry is read back.
On resume the resolved config stored in the sidecar is compared with the current one
(:func:`config_diff`), so a changed key is reported, never silently taken.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from ..dist import DistInfo, all_gather_objects
from .files import CheckpointError


class Stateful(Protocol):
    """Anything with ``state_dict()`` / ``load_state_dict(state)``: a part of a checkpoint."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def capture(parts: Mapping[str, Stateful]) -> dict[str, Any]:
    """The client state of a checkpoint: ``{name: part.state_dict()}``. All ranks call (some
    parts gather from every rank, e.g. :class:`RngStates`)."""
    return {name: part.state_dict() for name, part in parts.items()}


def restore(parts: Mapping[str, Stateful], state: Mapping[str, Any], source: str = "") -> None:
    """Load ``state`` (what :func:`capture` returned, read back) into ``parts``; all ranks call.

    Raises :class:`CheckpointError` when the entries differ from the parts: a checkpoint of
    another program, or one whose entries nobody would read back.
    """
    state = _upgrade(parts, dict(state))
    missing, unknown = sorted(set(parts) - set(state)), sorted(set(state) - set(parts))
    if missing or unknown:
        raise CheckpointError(f"checkpoint {source} does not match this trainer: missing "
                              f"{missing or 'nothing'}, unexpected {unknown or 'nothing'}")
    for name, part in parts.items():
        part.load_state_dict(state[name])


def _upgrade(parts: Mapping[str, Stateful], state: dict[str, Any]) -> dict[str, Any]:
    """A format-1 client state in today's layout, so a run started by the previous version
    resumes: format 1 also saved the epoch and config hash (never read back: dropped) and may
    lack parts added later (they keep their fresh state)."""
    if "config_hash" not in state:  # only format 1 saved it in the state
        return state
    for dropped in ("epoch", "config_hash"):
        state.pop(dropped, None)
    for name, part in parts.items():
        state.setdefault(name, part.state_dict())
    return state


# ----------------------------------------------------------------------------- RNG states

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


class RngStates:
    """Every rank's RNG states as one checkpoint part (ranks differ: dropout seeds)."""

    def __init__(self, dist: DistInfo) -> None:
        self.dist = dist

    def state_dict(self) -> list[dict[str, Any]]:
        """All ranks' states, gathered (collective: every rank calls) into rank 0's copy."""
        return all_gather_objects(self.dist, rng_state())

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        """This rank's state; another world size cannot continue bit-exactly, so then none."""
        if len(states) == self.dist.world_size:
            set_rng_state(states[self.dist.rank])


# ----------------------------------------------------------------------------- configs

def config_hash(obj: Any) -> str:
    """First 12 hex chars of the sha256 of ``obj`` (dataclass or JSON-able) dumped canonically."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    # Sorted keys and fixed separators: equal configs hash equal whatever their key order.
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# Keys that differ between a run and its resume by design: how it was launched, not what it is.
LAUNCH_KEYS = ("run.resume",)


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, list]:
    """``{dotted key: [saved value, current value]}`` for every key whose value changed (a key
    on one side only has None on the other); :data:`LAUNCH_KEYS` are not compared."""
    old, new = _flatten(saved), _flatten(current)
    return {key: [old.get(key), new.get(key)] for key in sorted(old.keys() | new.keys())
            if key not in LAUNCH_KEYS and old.get(key) != new.get(key)}


def describe_diff(diff: Mapping[str, list]) -> str:
    """``optim.lr 0.003 -> 0.001; train.epochs 8 -> 10`` (values as JSON)."""
    return "; ".join(f"{key} {json.dumps(a)} -> {json.dumps(b)}" for key, (a, b) in diff.items())


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    # Only sections are descended into: a dict-valued key (engine.deepspeed, model.kwargs)
    # compares as one value below its section, like a list.
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and not prefix:
            out.update(_flatten(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out
