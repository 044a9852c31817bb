"""K-fold cross-validation folds of the train split: assigned at pack time, one fold per shard.

Packing with ``--folds K`` puts every *train* sample in one of K folds, stratified per class
with scikit-learn's ``StratifiedKFold(shuffle=True, random_state=fold_seed)``; an explicit
``fold`` column of a CSV source wins. Each fold is written to its own shards
(``train-f{k}-NNNNNN.tar``), so a fold is a set of whole shards. The manifest keeps the whole
train split (what timm's ``ReaderWds`` reads) and adds a ``folds`` record listing each fold's
shards. At training time :func:`fold_view` turns fold k into a split layout the loader already
knows: train = the shards of the other K-1 folds, val = fold k's shards. Since the loader works
from shard lists with known lengths, exact epochs, exact eval and mid-epoch resume hold as for
any other split.

Why no separate val split with folds: fold k *is* the val split of the run ``data.fold=k``; a
packed val split next to the folds would be data that no fold run trains or validates on.
So with folds the val fraction defaults to 0 and a non-zero one is refused.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Sequence

from .errors import PackError
from .manifest import Manifest, SplitInfo

# pack.py imports this module, so the pack-time functions take its ``Item`` and
# ``PackSettings`` values without importing them (typed Any below, named in the docstrings).
Item = PackSettings = Any

SPLIT = "train"  # the split that is folded


def fold_name(k: int) -> str:
    """Shard-name stem of fold ``k``: its shards are ``train-f{k}-NNNNNN.tar``."""
    return f"{SPLIT}-f{k}"


def parse_cell(text: str | None, where: str) -> int | None:
    """A CSV ``fold`` cell: an integer, or None when empty (the fold is then assigned)."""
    text = (text or "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise PackError(f"fold column: {text!r} of {where} is not an integer") from None


def check_settings(folds: int, val_fraction: float | None) -> None:
    """PackError for fold settings that cannot work (called by ``PackSettings``)."""
    if folds < 0 or folds == 1:
        raise PackError(f"folds must be 0 (none) or at least 2, got {folds}")
    if folds and val_fraction:
        raise PackError(f"{folds} folds with val fraction {val_fraction}: each fold is the val "
                        "split of its run (data.fold=k), so pack with val fraction 0")


def settle(items: Sequence[Item], settings: PackSettings) -> tuple[list[Item], PackSettings]:
    """Resolve the fold count and the val fraction, and check the CSV's explicit folds.

    K is ``settings.folds``, or, when that is 0, inferred from a CSV ``fold`` column as its
    largest value + 1. Explicit folds must lie in ``[0, K)`` and belong to train rows (an item
    with a fold and no split becomes a train item); with folds, no row may be forced into val.
    Returns the items and the settings with ``folds`` and ``val_fraction`` filled in.
    """
    given = [item.fold for item in items if item.fold is not None]
    k = settings.folds or (max(given) + 1 if given else 0)
    val = settings.val_fraction
    settings = dataclasses.replace(settings, folds=k,
                                   val_fraction=(0.0 if k else 0.1) if val is None else val)
    if not k:
        return list(items), settings
    bad = [f for f in given if not 0 <= f < k]
    if bad:
        raise PackError(f"fold column: {len(bad)} value(s) outside [0, {k}) for {k} folds, "
                        f"e.g. {bad[0]}")
    misplaced = [item for item in items if item.split in ("val", "test") and item.fold is not None]
    if misplaced:
        raise PackError(f"fold column: {misplaced[0].path} has fold {misplaced[0].fold} but split "
                        f"{misplaced[0].split} (only train samples are folded; "
                        f"{len(misplaced)} such row(s))")
    forced_val = sum(item.split == "val" for item in items)
    if forced_val:
        raise PackError(f"{forced_val} row(s) have split val, but with {k} folds each fold is "
                        "the val split of its run: mark them train (or give them a fold)")
    items = [dataclasses.replace(item, split=SPLIT) if item.fold is not None else item
             for item in items]
    return items, settings


def assign(train: Sequence[Item], classes: Sequence[str], k: int, seed: int
           ) -> list[list[Item]]:
    """The train items of each of ``k`` folds, in their (already shuffled) input order.

    Items with an explicit fold keep it; the others are dealt out by
    ``StratifiedKFold(k, shuffle=True, random_state=seed)`` over the items sorted by path, so
    the folds depend on the seed and the set of train files only, not on the split shuffle.
    """
    fold_of: dict[int, int] = {id(item): item.fold for item in train if item.fold is not None}
    free = sorted((item for item in train if item.fold is None), key=lambda i: i.path)
    if free:
        from sklearn.model_selection import StratifiedKFold  # a second to import: only here

        if len(free) < k:
            raise PackError(f"{k} folds need at least {k} train samples to assign, "
                            f"found {len(free)}")
        index = {label: i for i, label in enumerate(classes)}
        labels = [index[item.label] for item in free]
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % 2**32)
        with warnings.catch_warnings():
            # "least populated class has fewer members than n_splits": legitimate for rare
            # classes (some folds then hold none of them); `ddp-shards info` shows the counts.
            warnings.simplefilter("ignore", UserWarning)
            for fold, (_, held_out) in enumerate(splitter.split(labels, labels)):
                for i in held_out:
                    fold_of[id(free[i])] = fold
    folds: list[list[Item]] = [[] for _ in range(k)]
    for item in train:
        folds[fold_of[id(item)]].append(item)
    empty = [f for f, group in enumerate(folds) if not group]
    if empty:
        raise PackError(f"fold(s) {', '.join(map(str, empty))} of {k} would hold no samples")
    return folds


def split_train(splits: dict[str, list[Item]], classes: Sequence[str],
                settings: PackSettings) -> dict[str, list[Item]]:
    """``splits`` with ``train`` replaced by one entry per fold (``train-f0``, ...), so that
    each fold is written to its own shards. A no-op without folds."""
    if not settings.folds:
        return splits
    folds = assign(splits[SPLIT], classes, settings.folds, settings.fold_seed)
    rest = {name: group for name, group in splits.items() if name != SPLIT}
    return {**{fold_name(f): group for f, group in enumerate(folds)}, **rest}


def join_train(infos: dict[str, SplitInfo], settings: PackSettings, items: Sequence[Item]
               ) -> tuple[dict[str, SplitInfo], dict[str, Any]]:
    """The written splits with the folds joined back into one ``train`` split (fold 0's shards
    first), and the manifest's ``folds`` record. A no-op (and ``{}``) without folds.

    ``items`` are the packed items; the record counts those whose fold the CSV set.
    """
    if not settings.folds:
        return infos, {}
    names = [fold_name(f) for f in range(settings.folds)]
    folds = [infos[name] for name in names]
    rest = {name: info for name, info in infos.items() if name not in names}
    record = {"num_folds": settings.folds, "seed": settings.fold_seed, "split": SPLIT,
              "explicit": sum(item.fold is not None for item in items),
              "folds": [{"fold": f, "num_samples": info.num_samples,
                         "filenames": info.filenames, "shard_lengths": info.shard_lengths,
                         "class_counts": info.class_counts} for f, info in enumerate(folds)]}
    return {SPLIT: concat(SPLIT, folds), **rest}, record


def concat(name: str, parts: Sequence[SplitInfo]) -> SplitInfo:
    """One split made of the shards of ``parts`` laid end to end, in order."""
    return SplitInfo(name=name, num_samples=sum(p.num_samples for p in parts),
                     filenames=[n for p in parts for n in p.filenames],
                     shard_lengths=[n for p in parts for n in p.shard_lengths],
                     sha256=[h for p in parts for h in p.sha256],
                     class_counts=[sum(c) for c in zip(*(p.class_counts for p in parts))])


def fold_splits(manifest: Manifest) -> list[SplitInfo]:
    """Each fold of a dataset packed with folds as a :class:`SplitInfo` (named ``fold{k}``);
    ValueError for a dataset packed without them."""
    if not manifest.folds:
        raise ValueError(f"{manifest.root} was packed without folds "
                         "(repack with ddp-shards pack SRC --folds K)")
    train = manifest.split(manifest.folds.get("split", SPLIT))
    sha = dict(zip(train.filenames, train.sha256))  # sha256 per shard lives in the split
    try:
        return [SplitInfo(name=f"fold{f['fold']}", num_samples=f["num_samples"],
                          filenames=list(f["filenames"]), shard_lengths=list(f["shard_lengths"]),
                          sha256=[sha[n] for n in f["filenames"]]
                          if set(f["filenames"]) <= sha.keys() else [],
                          class_counts=list(f.get("class_counts", [])))
                for f in manifest.folds["folds"]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{manifest.root}: malformed folds record (missing {e})") from None


def fold_view(manifest: Manifest, fold: int) -> Manifest:
    """The manifest as the run ``data.fold=fold`` sees it: ``train`` = the shards of the other
    folds (in fold order), ``val`` = fold ``fold``'s shards; other splits unchanged.

    ``fold < 0`` returns ``manifest`` itself. ValueError (a one-line message) when the dataset
    has no folds, ``fold`` is out of range, or the fold holds no samples.
    """
    if fold < 0:
        return manifest
    folds = fold_splits(manifest)
    if fold >= len(folds):
        raise ValueError(f"{fold} is out of range: {manifest.root} has {len(folds)} folds "
                         f"(0..{len(folds) - 1})")
    held, rest = folds[fold], [f for i, f in enumerate(folds) if i != fold]
    if not held.num_samples or not any(f.num_samples for f in rest):
        raise ValueError(f"fold {fold} of {manifest.root} leaves an empty train or val split")
    val = dataclasses.replace(held, name="val")
    return dataclasses.replace(manifest, splits={**manifest.splits, SPLIT: concat(SPLIT, rest),
                                                 "val": val})
