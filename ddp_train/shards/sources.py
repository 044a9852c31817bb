"""Which shard files make up each split of a dataset ``ddp-shards index`` reads.

A split's shards are named by ``--split NAME=PATTERN``: a glob (``train-*.tar``, local roots
only), a brace pattern (``train-{000000..000999}.tar``, any root: it is expanded, not listed)
or both. Without ``--split`` the sets come from an existing timm ``_info.json`` (its
``filenames``), else from the usual ``<split>-*.tar`` names in a local root. Remote roots
(URLs, ``pipe:`` templates) cannot be listed, so there the names must be given or found in a
manifest.

This module only names files; it reads no shard (and nothing of torch), so the loader's
"no manifest" error can call :func:`index_hint` cheaply.
"""
from __future__ import annotations

import glob
import json
import os
import shlex
from typing import Any

from braceexpand import braceexpand

from .locations import is_remote
from .tar import tar_samples

# Splits looked for under their usual names when no --split is given; any other *.tar is named
# with --split. "validation" is the name several published WebDatasets use for val.
DEFAULT_SPLITS = ("train", "val", "validation", "test")
GLOB_CHARS = frozenset("*?[")


def expand(root: str, pattern: str) -> list[str]:
    """File names (relative to ``root``) that ``pattern`` names, in order.

    Braces expand first, in their written order; a piece holding glob characters is matched
    against a local ``root`` and sorted. Plain names are taken as given (a missing file shows
    up as an unreadable shard when it is read). ValueError for a glob under a remote root or a
    pattern that matches nothing.
    """
    names: list[str] = []
    for piece in braceexpand(pattern):
        if not GLOB_CHARS & set(piece):
            names.append(piece)
            continue
        if is_remote(root):
            raise ValueError(f"{pattern!r}: a remote root ({root}) cannot be listed; name its "
                             "shards with a brace pattern, e.g. 'train-{000000..000099}.tar'")
        matches = sorted(glob.glob(piece, root_dir=root))
        if not matches:
            raise ValueError(f"{pattern!r} matches no file in {root}")
        names += [m for m in matches if os.path.isfile(os.path.join(root, m))]
    return names


def parse_split_args(args: list[str]) -> dict[str, str]:
    """``["train=train-*.tar", ...]`` -> ``{"train": "train-*.tar"}``; ValueError naming a bad
    or repeated one."""
    out: dict[str, str] = {}
    for arg in args:
        name, sep, pattern = arg.partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not name or not pattern:
            raise ValueError(f"--split {arg!r}: write NAME=PATTERN, e.g. train='train-*.tar'")
        if name in out:
            raise ValueError(f"--split {name} is given twice")
        out[name] = pattern
    return out


def default_sets(root: str) -> dict[str, list[str]]:
    """``{split: sorted names}`` of the ``<split>-*.tar`` files of a local root (may be {})."""
    sets = {}
    for split in DEFAULT_SPLITS:
        names = sorted(glob.glob(f"{glob.escape(split)}-*.tar", root_dir=root))
        if names:
            sets[split] = names
    return sets


def timm_sets(doc: dict[str, Any]) -> dict[str, list[str]]:
    """``{split: filenames}`` of a timm-style ``_info.json`` document (may be {})."""
    splits = doc.get("splits")
    if not isinstance(splits, dict):
        return {}
    return {name: list(s["filenames"]) for name, s in splits.items()
            if isinstance(s, dict) and isinstance(s.get("filenames"), list) and s["filenames"]}


def shard_sets(root: str, patterns: dict[str, str], doc: dict[str, Any] | None
               ) -> tuple[dict[str, list[str]], str]:
    """The shard names of each split, and where they came from (for the summary line).

    ``patterns`` (``--split``) win; then the ``filenames`` of ``doc`` (an existing manifest);
    then the usual names in a local root. ValueError when none of them gives a shard, or when
    one file is in two splits.
    """
    if patterns:
        sets, origin = {name: expand(root, p) for name, p in patterns.items()}, "--split"
    elif doc and timm_sets(doc):
        sets, origin = timm_sets(doc), "the existing _info.json"
    elif is_remote(root):
        raise ValueError(f"{root} is remote and cannot be listed: name its shards with --split "
                         "NAME=PATTERN, e.g. --split train='train-{000000..000099}.tar'")
    else:
        sets, origin = default_sets(root), "the <split>-*.tar names"
        if not sets:
            found = sorted(glob.glob("*.tar", root_dir=root))[:3]
            raise ValueError(f"no {'/'.join(DEFAULT_SPLITS)}-*.tar shards in {root}" + (
                f" (it has {', '.join(found)}, ...)" if found else " (no .tar files)") +
                ": name them with --split NAME=PATTERN, e.g. --split train='*.tar'")
    owner: dict[str, str] = {}
    for name, names in sets.items():
        if not names:
            raise ValueError(f"split {name}: no shards")
        for n in names:
            if n in owner:
                raise ValueError(f"{n} is in split {owner[n]} and in split {name}")
            owner[n] = name
    return sets, origin


def index_command(root: str, extra: str = "") -> str:
    """The ``ddp-shards index`` command line for ``root`` (``extra``: more arguments)."""
    line = f"ddp-shards index {shlex.quote(root)}"
    if not is_remote(root) and not os.access(root, os.W_OK):
        line += " --out WRITABLE_DIR"
    return line + (f" {extra}" if extra else "")


def index_hint(root: str) -> str:
    """For a folder holding ``.tar`` shards but no manifest: the sentence telling which
    ``ddp-shards index`` command writes one ('' when the folder holds no shards). A remote root
    cannot be listed: its sentence shows the command's shape."""
    if is_remote(root):  # cannot be listed: the command needs the names and a local --out
        return (f"if the shards there have none, index them with `ddp-shards index "
                f"{shlex.quote(root)} --out DIR --split train='train-{{000000..000099}}.tar'` "
                "(your shard names) and set data.shards to DIR")
    if not os.path.isdir(root):
        return ""
    tars = sorted(glob.glob("*.tar", root_dir=root))
    if not tars:
        return ""
    # not the usual <split>-*.tar names: the whole folder as one train split is a start
    extra = "" if default_sets(root) else "--split train='*.tar'"
    extra = " ".join(filter(None, [extra, _label_hint(os.path.join(root, tars[0]))]))
    return (f"{len(tars)} .tar files there were not written by ddp-shards pack; index them "
            f"with `{index_command(root, extra)}`")


def _label_hint(path: str) -> str:
    """``--label-key ...`` when the first sample of ``path`` has no ``cls`` member, else ''."""
    try:
        with open(path, "rb") as f:
            raw = next(tar_samples(f), None)
    except Exception:  # unreadable: the index itself will say so
        return ""
    if raw is None or "cls" in raw:
        return ""
    if "txt" in raw:
        return "--label-key txt"
    if "json" in raw:
        try:
            fields = json.loads(raw["json"])
        except ValueError:
            fields = {}
        names = [k for k in ("label", "class", "category", "target", "cls")
                 if isinstance(fields, dict) and k in fields]
        return f"--label-key json:{names[0] if names else 'FIELD'}"
    return "--label-key MEMBER"
