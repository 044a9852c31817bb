"""Build the train or eval loader for one rank: exact epochs, exact eval, resumable mid-epoch."""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader

from ..config import AugmentConfig, ConfigError, DataConfig
from ..dist import DistInfo
from ..guard import ignore_stop_signals
from ..shards.folds import fold_view
from ..shards.labels import LabelReader
from ..shards.manifest import Manifest, load_manifest
from . import plan
from .stream import ProblemLog, ShardStream


class ShardLoader:
    """Iterates one rank's batches of a split, one epoch per ``iter()``.

    Train: ``len()`` batches on every rank, then the epoch counter advances. The position is
    ``state_dict()`` = {epoch, batches consumed}; a loader given that state yields exactly the
    batches the uninterrupted loader would have yielded next. Eval: each sample of the split is
    yielded by exactly one rank, once.
    """

    def __init__(self, stream: ShardStream, *, num_workers: int, pin_memory: bool,
                 prefetch_factor: int, manifest: Manifest, split: str) -> None:
        self.stream, self.manifest, self.split = stream, manifest, split
        self.num_workers, self.pin_memory, self.prefetch_factor = (num_workers, pin_memory,
                                                                   prefetch_factor)
        self.epoch = 0
        self.consumed = 0  # batches of the current epoch already handed out

    @property
    def layout(self) -> plan.RankLayout:
        """This rank's layout of the split: what every count below derives from."""
        return self.stream.layout

    @property
    def num_samples(self) -> int:
        """Samples in the split (from the manifest)."""
        return self.layout.num_samples

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch (identical on all ranks when training)."""
        return self.layout.batches()

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        self.epoch, self.consumed = epoch, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stream.epoch, self.stream.start_batch = self.epoch, self.consumed
        # Workers are not persistent: each epoch (and each resume) starts them afresh so they
        # pick up the new epoch and start point; the cost is one worker start-up per epoch.
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.pin_memory and torch.cuda.is_available(),
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            # round-robin order is what the resume math relies on
                            in_order=True,
                            worker_init_fn=ignore_stop_signals if self.num_workers else None)
        for inputs, labels in loader:
            self.consumed += 1
            yield inputs, torch.tensor(labels)  # workers send a list (stream.collate says why)
        if self.layout.train:
            self.set_epoch(self.epoch + 1)
        else:
            self.consumed = 0

    def state_dict(self) -> dict:
        """Position in the stream: epoch, batches (and samples) this rank has consumed."""
        layout = self.layout
        epoch, consumed = self.epoch, self.consumed
        if layout.train and consumed >= len(self):  # a finished epoch is the start of the next
            epoch, consumed = epoch + 1, 0
        return {"split": self.split, "epoch": epoch, "batches": consumed,
                "samples": consumed * layout.batch_size, "world_size": layout.world_size,
                "batch_size": layout.batch_size, "num_samples": layout.num_samples,
                "seed": self.stream.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. Mid-epoch positions need the same world size, batch size and
        split size; with a different layout the loader restarts at the next epoch boundary."""
        layout = self.layout
        same = (state["world_size"], state["batch_size"], state["num_samples"]) == (
            layout.world_size, layout.batch_size, layout.num_samples)
        if same:
            self.epoch, self.consumed = int(state["epoch"]), int(state["batches"])
        else:
            self.set_epoch(int(state["epoch"]) + (1 if state["batches"] else 0))


def build_transform(cfg: DataConfig, train: bool, augment: Optional[AugmentConfig] = None):
    """timm's standard train/eval transform at ``cfg.image_size`` (eval is deterministic).

    ``augment`` adds timm's auto-augment policy and random erasing to the train transform.
    """
    if train:
        aug = augment or AugmentConfig()
        try:
            return create_transform(cfg.image_size, is_training=True, scale=tuple(cfg.scale),
                                    ratio=tuple(cfg.ratio), hflip=cfg.hflip,
                                    color_jitter=cfg.color_jitter or None,
                                    interpolation=cfg.interpolation, mean=tuple(cfg.mean),
                                    std=tuple(cfg.std), auto_augment=aug.auto_augment or None,
                                    re_prob=aug.re_prob, re_mode=aug.re_mode,
                                    re_count=aug.re_count)
        except (AssertionError, KeyError, ValueError, IndexError) as e:
            raise ValueError(f"augment.auto_augment: timm rejects {aug.auto_augment!r} "
                             f"({e!r})") from None
    return create_transform(cfg.image_size, is_training=False, interpolation=cfg.interpolation,
                            mean=tuple(cfg.mean), std=tuple(cfg.std), crop_pct=cfg.crop_pct)


def extra_specs(manifest: Manifest, names: list[str]) -> dict[str, dict]:
    """The manifest specs of the extra members ``names`` (``data.extras``); ValueError if absent."""
    missing = [name for name in names if name not in manifest.extras]
    if missing:
        raise ValueError(f"data.extras: {', '.join(missing)} not packed in {manifest.root} (it "
                         f"has: {', '.join(manifest.extras) or 'no extras'})")
    return {name: manifest.extras[name] for name in names}


def apply_fold(manifest: Manifest, cfg: DataConfig) -> Manifest:
    """The manifest as a run with ``cfg`` sees it: with ``data.fold=k``, ``train`` is the shards
    of the other folds and ``val`` fold k's shards (``shards.folds.fold_view``); unchanged for
    ``data.fold=-1``. A one-line ConfigError naming ``data.fold`` when that cannot be done."""
    try:
        return fold_view(manifest, cfg.fold)
    except ValueError as e:
        raise ConfigError(f"data.fold: {e}") from None


def build_loader(cfg: DataConfig, dist: DistInfo, *, split: str, train: bool, batch_size: int,
                 seed: int, problems_path: str = "", manifest: Manifest | None = None,
                 augment: Optional[AugmentConfig] = None) -> ShardLoader:
    """The loader of ``split`` for this rank.

    The rank's :class:`plan.RankLayout` comes from the manifest's shard lengths and ``dist``;
    each worker then runs :meth:`ShardStream.__iter__` (read its position range -> block
    shuffle -> decode + timm transform -> batch). ``problems_path`` is the run's
    problematic-sample log. A given ``manifest`` is used as is (the trainer passes one with
    ``data.fold`` applied); one loaded here gets ``data.fold`` applied.
    """
    manifest = manifest or apply_fold(load_manifest(cfg.shards), cfg)
    info = manifest.split(split)
    roles = max(1, cfg.num_workers)
    class_weights = None
    if train and cfg.class_balance:
        if len(info.class_counts) != manifest.num_classes:
            raise ValueError("class_balance needs per-class counts (class_counts) in the "
                             f"manifest of {cfg.shards}; repack it with ddp-shards pack")
        class_weights = plan.class_sampling_weights(info.class_counts, cfg.class_balance)
    lengths = list(info.shard_lengths)
    layout = plan.RankLayout(num_samples=sum(lengths), world_size=dist.world_size,
                             rank=dist.rank, roles=roles, batch_size=batch_size, train=train)
    stream = ShardStream(layout, manifest.urls(split), lengths, seed=seed,
                         shuffle_buffer=cfg.shuffle_buffer,
                         transform=build_transform(cfg, train, augment),
                         problems=ProblemLog(problems_path, split), class_weights=class_weights,
                         extras=extra_specs(manifest, cfg.extras),
                         labels=LabelReader(manifest.label, manifest.classes))
    loader = ShardLoader(stream, num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
                         prefetch_factor=cfg.prefetch_factor, manifest=manifest, split=split)
    if train:
        len(loader)  # fail now, with the message from train_steps, if the split is too small
    return loader
