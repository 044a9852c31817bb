"""The shard manifest ``_info.json``: what a packed dataset holds, read by packer, loader and timm.

The layout is a superset of the one timm's ``ReaderWds`` reads
(``splits.{name}.{name,num_samples,filenames,shard_lengths}``, file names relative to the
dataset root). ddp-train adds class names, per-class counts and sha256 per shard, the pack
settings and, when packed with ``--folds``, the k-fold record of the train split. A manifest
written by ``ddp-shards index`` for shards other tools wrote also says where their labels are
(``label``), how it was indexed (``index``) and, when it lives apart from its shards, where
they are (``shard_root``). See ``shards/README.md`` for the full format.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .locations import is_remote, join, open_stream  # is_remote, join: re-exported

INFO_NAME = "_info.json"
PROBLEMS_NAME = "problematic_files.jsonl"
FORMAT = "ddp-train-shards"
VERSION = 1


@dataclass
class SplitInfo:
    """One split: its shards in order, with sample counts, hashes and class balance."""

    name: str
    num_samples: int
    filenames: list[str]  # relative to the dataset root
    shard_lengths: list[int]  # samples per shard, same order as filenames
    sha256: list[str] = field(default_factory=list)  # hex digest per shard
    class_counts: list[int] = field(default_factory=list)  # samples per class index
    shard_class_counts: list[list[int]] = field(default_factory=list)  # per shard (index only)

    def __post_init__(self) -> None:
        if len(self.filenames) != len(self.shard_lengths):
            raise ValueError(f"split {self.name!r}: {len(self.filenames)} filenames but "
                             f"{len(self.shard_lengths)} shard_lengths")
        if sum(self.shard_lengths) != self.num_samples:
            raise ValueError(f"split {self.name!r}: shard_lengths sum to {sum(self.shard_lengths)}"
                             f", num_samples says {self.num_samples}")


@dataclass
class Manifest:
    """A packed dataset: root location, class names in index order, and its splits."""

    root: str  # directory or URL prefix the filenames are relative to (not stored in the file)
    classes: list[str]
    splits: dict[str, SplitInfo]
    pack: dict[str, Any] = field(default_factory=dict)  # settings the packer ran with
    problematic: int = 0  # files skipped while packing (listed in problematic_files.jsonl)
    # extra member per CSV column: {"sensor": {"member": "sensor.npy", "shape": [3, 64]}, ...}
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    # k-fold record of the train split (packed with --folds; see shards/folds.py): {} = no folds
    folds: dict[str, Any] = field(default_factory=dict)
    # where labels are ({"member", "field", "kind"}, shards/labels.py); {} = pack's cls numbers
    label: dict[str, Any] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)  # ddp-shards index settings; {} = packed
    # shard location as written in the file when the manifest lives apart from its shards
    # (relative to the manifest's folder, absolute, a URL or a pipe: template); root is resolved
    shard_root: str = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (length of ``classes``)."""
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """The split called ``name``, or a ValueError naming the splits that exist."""
        if name not in self.splits:
            raise ValueError(f"split {name!r} not in {self.root}/{INFO_NAME} "
                             f"(has: {', '.join(sorted(self.splits)) or 'none'})")
        return self.splits[name]

    def urls(self, name: str) -> list[str]:
        """Full shard locations of split ``name`` (local paths, URLs or ``pipe:`` commands)."""
        return [join(self.root, f) for f in self.split(name).filenames]

    def to_json(self) -> dict[str, Any]:
        """The ``_info.json`` document."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "splits": {k: asdict(v) for k, v in self.splits.items()},
            **({"pack": self.pack} if self.pack else {}),
            "problematic": self.problematic,
            **({"extras": self.extras} if self.extras else {}),
            **({"folds": self.folds} if self.folds else {}),
            **({"label": self.label} if self.label else {}),
            **({"index": self.index} if self.index else {}),
            **({"shard_root": self.shard_root} if self.shard_root else {}),
        }


def read_doc(root: str) -> dict[str, Any]:
    """The parsed ``root/_info.json`` (local or any URL webdataset can open).

    FileNotFoundError when there is none; ValueError when it is not a JSON object.
    """
    path = join(root, INFO_NAME)
    try:
        with open_stream(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} is not a JSON object")
    return doc


def resolve_shard_root(home: str, shard_root: str) -> str:
    """Where the shards of the manifest in ``home`` are: ``home`` itself unless the manifest
    names a ``shard_root`` (a relative one is relative to ``home``)."""
    if not shard_root:
        return home
    if is_remote(shard_root) or os.path.isabs(shard_root) or is_remote(home):
        return shard_root
    return os.path.normpath(os.path.join(home, shard_root))


def load_manifest(root: str) -> Manifest:
    """Read ``root/_info.json`` (local or any URL webdataset can open) into a Manifest.

    Shards with no manifest, or with timm's alone (no classes), get an error naming the
    ``ddp-shards index`` command that writes one.
    """
    path = join(root, INFO_NAME)
    try:
        doc = read_doc(root)
    except OSError as e:
        if not (isinstance(e, FileNotFoundError) or is_remote(root)):
            raise  # a local permission or I/O error says what it is; a pipe/URL only "exit N"
        from .sources import index_hint  # lists the folder: only on this error path

        hint = index_hint(root)
        status = re.search(r"exit (\d+)", str(e))  # gopen's error repeats the whole command
        seen = "" if not is_remote(root) else (
            f" (the read exited with status {status.group(1)})" if status else f" ({e})")
        raise FileNotFoundError(f"no shard manifest at {path}{seen}: " + (
            hint or f"pack a dataset first (ddp-shards pack SRC --out {root})")) from None
    if "classes" not in doc and isinstance(doc.get("splits"), dict):
        from .sources import index_command

        raise ValueError(f"{path} is timm's shard manifest, without class names: complete it "
                         f"with `{index_command(root)}`")
    try:
        splits = {k: SplitInfo(**{f: v[f] for f in SplitInfo.__dataclass_fields__ if f in v})
                  for k, v in doc["splits"].items()}
        classes = list(doc["classes"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a ddp-train shard manifest (missing {e})") from None
    shard_root = str(doc.get("shard_root") or "")
    return Manifest(root=resolve_shard_root(root, shard_root), classes=classes, splits=splits,
                    pack=doc.get("pack", {}), problematic=int(doc.get("problematic", 0)),
                    extras=doc.get("extras", {}), folds=doc.get("folds", {}),
                    label=doc.get("label", {}), index=doc.get("index", {}),
                    shard_root=shard_root)


def write_manifest(manifest: Manifest, directory: str, base: dict[str, Any] | None = None) -> str:
    """Write ``directory/_info.json`` atomically (temp file then rename); return its path.

    ``base`` is a document to complete (timm's ``_info.json``): its keys that ddp-train does
    not write are kept, at the top level and in each split.
    """
    doc = manifest.to_json()
    if base:
        splits = {name: {**(base.get("splits", {}).get(name) or {}), **split}
                  for name, split in doc["splits"].items()}
        doc = {**base, **doc, "splits": splits}
    path = os.path.join(directory, INFO_NAME)
    write_atomic(path, json.dumps(doc, indent=1))
    return path


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file, fsync'd, then renamed over it: a reader
    (or a crash) sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
