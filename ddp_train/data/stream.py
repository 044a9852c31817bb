"""The per-worker sample stream: exact position ranges of tar shards -> shuffled, decoded batches.

Each DataLoader worker of each rank runs :meth:`ShardStream.__iter__`, a list of stages. The plan
(:mod:`ddp_train.data.plan`) decides which global positions the worker reads; the stages only
read, shuffle, decode and batch them, so the batch count never depends on the shard layout.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import time
from itertools import islice
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, default_collate, get_worker_info

from ..shards import extras as extra_members
from ..shards.labels import IMAGE_KEYS, LabelReader
from ..shards.tar import tar_samples
from . import plan

log = logging.getLogger(__name__)


class ProblemLog:
    """Appends one JSON line per unreadable sample; safe from many worker processes at once."""

    def __init__(self, path: str = "", split: str = "") -> None:
        self.path, self.split = path, split

    def __call__(self, url: str, key: Optional[str], error: str) -> None:
        log.warning("skipping sample %s in %s: %s", key, url, error)
        if not self.path:
            return
        line = json.dumps({"time": time.time(), "split": self.split, "url": url, "key": key,
                           "error": error}) + "\n"
        # O_APPEND writes of one short line are atomic on local filesystems, so workers of all
        # ranks can share the file without a lock.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def read_positions(urls: list[str], lengths: list[int], order: list[int], begin: int, end: int,
                   problems: ProblemLog, labels: Optional[LabelReader] = None
                   ) -> Iterator[tuple[int, Optional[dict]]]:
    """Yield ``(position, raw sample)`` for global positions ``[begin, end)``, undecoded.

    With ``labels`` (the manifest's label record) only samples holding an image and a label
    are positions, as ``ddp-shards index`` counted them, and each gets ``__label__``; packed
    shards hold no others.

    Whole shards before ``begin`` are never opened (their lengths come from the manifest); inside
    the first shard, members before the start are read as bytes and dropped, not decoded. A shard
    that cannot be read, or ends early, yields ``None`` for each missing member so the count of
    positions stays exact (the decode stage substitutes them).
    """
    pos = begin
    for piece in plan.pieces(lengths, order, begin, end):
        url = urls[piece.shard]
        got = 0
        try:
            with wds.gopen(url, "rb") as stream:  # local path, URL or pipe: command
                samples = tar_samples(stream)
                if labels is not None:
                    samples = labels.usable(samples)
                for raw in islice(samples, piece.start, piece.start + piece.count):
                    raw["__url__"] = url
                    yield pos, raw
                    pos, got = pos + 1, got + 1
        except Exception as e:  # a broken tar must not change how many samples this rank yields
            problems(url, None, f"shard unreadable after {got} of {piece.count} members: {e!r}")
        for _ in range(piece.count - got):
            yield pos, None
            pos += 1


def resample_block(chunk: list[tuple[int, Optional[dict]]], class_weights: list[float],
                   rng: random.Random) -> list[tuple[int, Optional[dict]]]:
    """Draw ``len(chunk)`` samples from ``chunk`` with replacement, each with probability
    proportional to its class's weight; output slot ``k`` takes position ``chunk[0][0] + k``.

    The block keeps its size, so every count the plan computed (batches per rank and role, the
    resume point) stays exact; only which samples fill the slots changes. The slot position (not
    the source's) seeds augmentation, so a sample drawn twice is augmented twice differently.
    Labels are the reader's ``__label__`` (or the raw ``cls`` bytes): nothing is decoded.
    """
    weights = []
    for _, raw in chunk:
        try:
            label = -1 if raw is None else sample_label(raw)
        except (KeyError, ValueError):
            label = -1  # undecodable label: never drawn (the decode stage would log it)
        weights.append(class_weights[label] if 0 <= label < len(class_weights) else 0.0)
    if not any(weights):
        rng.shuffle(chunk)
        return chunk
    picks = rng.choices(range(len(chunk)), weights=weights, k=len(chunk))
    return [(chunk[0][0] + k, chunk[i][1]) for k, i in enumerate(picks)]


def block_shuffle(items: Iterator[tuple[int, Optional[dict]]], block: int, *, seed: int,
                  epoch: int, drop: int, shuffle: bool,
                  class_weights: Optional[list[float]] = None
                  ) -> Iterator[tuple[int, Optional[dict]]]:
    """Shuffle raw samples in consecutive blocks of ``block``, then drop the first ``drop``.

    Why not webdataset's buffer shuffle: its output at any point depends on everything read
    before, so a resumed run would have to re-read the whole epoch. A block's permutation depends
    only on its first position, so a resume starts at the block that holds the resume point.
    Samples are still raw bytes here: skipped ones are never decoded. With ``class_weights`` each
    block is resampled by class instead of permuted (:func:`resample_block`).
    """
    if not shuffle:
        yield from islice(items, drop, None)
        return
    while True:
        chunk = list(islice(items, block))
        if not chunk:
            return
        rng = random.Random(f"block-{seed}-{epoch}-{chunk[0][0]}")
        if class_weights:
            chunk = resample_block(chunk, class_weights, rng)
        else:
            rng.shuffle(chunk)
        if drop:
            chunk, drop = chunk[drop:], max(0, drop - len(chunk))
        yield from chunk


def seed_sample(seed: int, epoch: int, pos: int) -> None:
    """Seed the RNGs transforms use from (seed, epoch, position): augmentation is then a function
    of the sample, not of worker count or of how far the worker had got (exact resume)."""
    s = (seed * 1_000_003 + epoch) * 10_000_019 + pos
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.random.default_generator.manual_seed(s % 2**63)


def decode_sample(raw: dict) -> tuple[Image.Image, int]:
    """The RGB image and the int label of a raw sample; other fields stay undecoded.

    Hand-written instead of webdataset's ``Decoder``: that one runs its handler chain on every
    field (json, cls, image) and converts each image twice, which measured as ~2x the PIL time
    per sample here (bench/loader.py). Only the two fields training needs are decoded.
    """
    data = next(raw[k] for k in IMAGE_KEYS if k in raw)
    image = Image.open(io.BytesIO(data))
    image.load()  # decode now, inside the caller's try: a truncated file fails here
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image, sample_label(raw)


def sample_label(raw: dict) -> int:
    """The class index of a raw sample: what the read stage's label reader found, else (a
    stream built without one) the ``cls`` member's number."""
    return raw["__label__"] if "__label__" in raw else int(raw["cls"])


def decode_and_transform(items: Iterator[tuple[int, Optional[dict]]], transform: Callable,
                         problems: ProblemLog, *, train: bool, seed: int = 0, epoch: int = 0,
                         extras: Optional[dict] = None) -> Iterator[tuple[object, int]]:
    """Decode image + label and apply the transform. Unreadable samples are logged; in training
    the next good sample is repeated in their place so every rank keeps its exact batch count
    (a short rank would hang DDP), in eval they are dropped (eval has no collectives).

    ``train`` also seeds the augmentation RNGs per sample from ``(seed, epoch, position)``;
    eval transforms are deterministic, so ``seed`` and ``epoch`` only matter in training.

    With ``extras`` ({name: manifest spec}) the input is a dict ``{"image": tensor, name:
    tensor, ...}`` (collated into a dict of batches); a sample missing one counts as unreadable.
    """
    owed, last = 0, None
    for pos, raw in items:
        try:
            if raw is None:
                raise ValueError("missing from its shard")
            image, label = decode_sample(raw)
            if train:
                seed_sample(seed, epoch, pos)
            out = (transform(image), label)
            if extras:
                out = ({"image": out[0], **{name: extra_members.decode(raw[spec["member"]], spec)
                                            for name, spec in extras.items()}}, label)
        except Exception as e:
            raw = raw or {}
            problems(str(raw.get("__url__", "?")), raw.get("__key__"), repr(e))
            owed += int(train)
            continue
        for _ in range(1 + owed):
            yield out
        owed, last = 0, out
    if owed:
        if last is None:
            raise RuntimeError("every sample of a loader worker's range is unreadable; see the "
                               "problematic-sample log")
        yield from [last] * owed


def collate(samples: list[tuple[object, int]]) -> tuple[object, list[int]]:
    """``(inputs batch, labels)`` with the labels left a plain list: :class:`ShardLoader` makes
    the tensor in the training process.

    Why: every tensor a DataLoader worker returns crosses to the main process through its own
    shared-memory segment and a file-descriptor handshake with the worker; for 32 labels that
    handshake costs more CPU than the labels themselves (~0.3 ms per batch, main process and
    worker together, measured here; ~10 us per image). A list travels in the pickled message.
    """
    return default_collate([x for x, _ in samples]), [y for _, y in samples]


class _IsolatedRng:
    """Run an iterator with its own RNG states. Only used when the stream runs in the training
    process (num_workers=0): per-sample seeding must not reset the model's dropout RNG."""

    def __init__(self, it: Iterator) -> None:
        self.it = it
        self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())

    def __iter__(self) -> "_IsolatedRng":
        return self

    def __next__(self):
        outer = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])
        try:
            return next(self.it)
        finally:
            self.states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
            random.setstate(outer[0])
            np.random.set_state(outer[1])
            torch.set_rng_state(outer[2])


class ShardStream(IterableDataset):
    """One rank's share of a split for one epoch; DataLoader workers each take one role of it.

    ``layout`` says which positions the rank and each role read (:class:`plan.RankLayout`);
    ``urls`` and ``lengths`` are the split's shards in manifest order (``sum(lengths)`` is
    ``layout.num_samples``). ``seed`` drives the shard order, the block shuffle and the
    per-sample augmentation; ``shuffle_buffer`` is the block size. ``transform``, ``problems``
    and ``extras`` ({name: manifest spec} of extra members loaded with the image) are passed to
    :func:`decode_and_transform`; ``labels`` to :func:`read_positions`; ``class_weights``
    (train) turns block shuffling into class-weighted resampling (:func:`resample_block`).

    ``epoch`` and ``start_batch`` are set by the loader before a DataLoader is built (workers are
    re-created every epoch, so they see the current values).
    """

    def __init__(self, layout: plan.RankLayout, urls: list[str], lengths: list[int], *,
                 seed: int, shuffle_buffer: int, transform: Callable, problems: ProblemLog,
                 class_weights: Optional[list[float]] = None,
                 extras: Optional[dict] = None, labels: Optional[LabelReader] = None) -> None:
        super().__init__()
        if sum(lengths) != layout.num_samples:  # the plan's counts would not match the shards
            raise ValueError(f"layout has {layout.num_samples} samples, the shards "
                             f"{sum(lengths)}")
        self.layout, self.urls, self.lengths = layout, urls, lengths
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.transform, self.problems = transform, problems
        self.class_weights = class_weights  # train: per-class sampling weights (None = off)
        self.extras = extras or {}  # extra member name -> manifest spec, loaded with the image
        self.labels = labels  # the manifest's label record: which samples count, their labels
        self.epoch = 0
        self.start_batch = 0  # rank batches already consumed this epoch (resume point)

    def __iter__(self):
        layout = self.layout
        info = get_worker_info()
        worker = info.id if info is not None else 0
        # The DataLoader's round robin always starts at worker 0; after a resume at rank batch j
        # the next batch belongs to role j % K, so worker w plays role (w + j) % K.
        role = (worker + self.start_batch) % layout.roles
        r = layout.role_range(role, self.start_batch)
        order = plan.shard_order(len(self.urls), self.seed, self.epoch, shuffle=layout.train)
        block = self.shuffle_buffer
        first = r.begin + (r.skip // block) * block  # start of the block holding the resume point
        # (position, raw sample) for the role's range from the resume block on; nothing decoded
        stream = read_positions(self.urls, self.lengths, order, first, r.end, self.problems,
                                self.labels)
        # same, shuffled within blocks; the already-consumed head is dropped
        stream = block_shuffle(stream, block, seed=self.seed, epoch=self.epoch,
                               drop=r.skip - (first - r.begin), shuffle=layout.train,
                               class_weights=self.class_weights)
        # (image tensor CHW, label), exactly one per position in training
        stream = decode_and_transform(stream, self.transform, self.problems, train=layout.train,
                                      seed=self.seed, epoch=self.epoch, extras=self.extras)
        # (images [B,C,H,W], labels as a list of B ints); train ranges are whole batches, eval
        # keeps the remainder
        stream = wds.filters.batched(layout.batch_size, collation_fn=collate,
                                     partial=True)(stream)
        return _IsolatedRng(stream) if info is None else stream
