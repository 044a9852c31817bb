"""Read-only views of a packed dataset: the ``ddp-shards info`` tables and ``verify`` re-hashing.
"""
from __future__ import annotations

import os

from rich.table import Table

from .locations import HashingReader, open_stream
from .manifest import Manifest, is_remote, join


def sha256_file(path: str) -> str:
    """Hex sha256 of a file (or, for a URL or ``pipe:`` command, of its stream)."""
    with open_stream(path) as f:
        return HashingReader(f).drain()


def describe(manifest: Manifest) -> str:
    """One header line: where, how many classes, how it was packed, how many files were skipped."""
    p, i = manifest.pack, manifest.index
    line = f"{manifest.root}: {manifest.num_classes} classes"
    if p:
        line += (f", packed {p.get('created', '?')} from {p.get('source', '?')} "
                 f"(seed {p.get('seed', '?')}, resize {p.get('resize') or 'off'})")
    if i:
        line += f", indexed {i.get('created', '?')} (labels from {i.get('label_key', '?')})"
    if i:  # index problems are samples without image or label, and unreadable shards
        return line + (f", {manifest.problematic} problems left out (of them "
                       f"{len(i.get('skipped_shards', []))} unreadable shards)")
    return line + f", {manifest.problematic} problematic files skipped"


def split_table(manifest: Manifest) -> Table:
    """Shards, samples and share of all samples per split."""
    total = sum(s.num_samples for s in manifest.splits.values()) or 1
    table = Table(title="splits")
    for column in ("split", "shards", "samples", "share", "samples/shard"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, s in manifest.splits.items():
        per_shard = f"{min(s.shard_lengths)}-{max(s.shard_lengths)}" if s.shard_lengths else "-"
        table.add_row(name, str(len(s.filenames)), str(s.num_samples),
                      f"{100 * s.num_samples / total:.1f}%", per_shard)
    return table


def class_table(manifest: Manifest) -> Table:
    """Per-class sample counts in each split, with the class's share of that split."""
    table = Table(title="class balance")
    table.add_column("#", justify="right")
    table.add_column("class")
    for name in manifest.splits:
        table.add_column(name, justify="right")
    for index, label in enumerate(manifest.classes):
        cells = []
        for s in manifest.splits.values():
            count = s.class_counts[index] if index < len(s.class_counts) else 0
            cells.append(f"{count} ({100 * count / s.num_samples:.0f}%)" if s.num_samples else "0")
        table.add_row(str(index), label, *cells)
    return table


def fold_table(manifest: Manifest) -> Table:
    """One row per cross-validation fold: samples, shards and per-class counts."""
    record = manifest.folds
    table = Table(title=f"{record.get('num_folds', '?')} folds of {record.get('split', 'train')} "
                  f"(seed {record.get('seed', '?')})")
    for column in ("fold", "shards", "samples", "class counts"):
        table.add_column(column, justify="left" if column == "class counts" else "right")
    for fold in record.get("folds", []):
        counts = ", ".join(f"{label} {n}" for label, n in zip(manifest.classes,
                                                               fold.get("class_counts", [])))
        table.add_row(str(fold["fold"]), str(len(fold["filenames"])), str(fold["num_samples"]),
                      counts)
    return table


def verify(manifest: Manifest) -> tuple[list[str], int]:
    """Re-hash every shard against the manifest: local files, or through webdataset's ``gopen``
    for a URL or ``pipe:`` shard root (an index written with ``--out``).

    Returns (one message per missing, unreadable or mismatched shard, number of shards checked).
    """
    problems, checked = [], 0
    for split in manifest.splits.values():
        if len(split.sha256) != len(split.filenames):
            problems.append(f"split {split.name}: manifest has no sha256 for every shard")
            continue
        for fname, expected in zip(split.filenames, split.sha256):
            path = join(manifest.root, fname)
            checked += 1
            if not is_remote(path) and not os.path.isfile(path):
                problems.append(f"{path}: missing")
                continue
            try:
                actual = sha256_file(path)
            except Exception as e:  # a remote read failing is this shard's problem, not fatal
                problems.append(f"{path}: unreadable ({e})")
                continue
            if actual != expected:
                problems.append(f"{path}: sha256 mismatch (shard changed since it was "
                                f"{'indexed' if manifest.index else 'packed'})")
    return problems, checked
