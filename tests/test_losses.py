"""Recipes' building blocks in one process: class weights, focal loss, mixup, balanced sampling."""
from __future__ import annotations

import collections
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from sklearn.utils.class_weight import compute_class_weight

from shardgen import png_bytes
from ddp_train.config import AugmentConfig, ConfigError, DataConfig, LossConfig, load_config
from ddp_train.data import build_loader
from ddp_train.dist import DistInfo
from ddp_train.losses import FocalLoss, build_criterion, build_mixup, class_weights
from ddp_train.shards.manifest import Manifest, SplitInfo, write_manifest

SKEWED = [120, 30, 9, 1]  # train samples per class


def write_skewed_shards(root: str, counts: list[int] = SKEWED) -> Manifest:
    """A train split whose class ``c`` has ``counts[c]`` samples, spread over uneven shards,
    with the per-class counts in its manifest as the packer writes them."""
    labels = [c for c, n in enumerate(counts) for _ in range(n)]
    np.random.default_rng(0).shuffle(labels)
    lengths, names, start = [37, 50, len(labels) - 87], [], 0
    for i, n in enumerate(lengths):
        names.append(f"train-{i:06d}.tar")
        with wds.TarWriter(os.path.join(root, names[-1])) as w:
            for j in range(start, start + n):
                w.write({"__key__": f"s{j:06d}", "png": png_bytes(j), "cls": int(labels[j])})
        start += n
    split = SplitInfo("train", len(labels), names, lengths, class_counts=list(counts))
    manifest = Manifest(root=root, classes=[f"c{i}" for i in range(len(counts))],
                        splits={"train": split})
    write_manifest(manifest, root)
    return manifest


# ----------------------------------------------------------------------------- class weights

def test_balanced_weights_equal_sklearn():
    labels = np.repeat(np.arange(len(SKEWED)), SKEWED)
    expected = compute_class_weight("balanced", classes=np.arange(len(SKEWED)), y=labels)
    ours = class_weights("balanced", SKEWED, len(SKEWED))
    assert torch.allclose(ours, torch.tensor(expected, dtype=torch.float32))
    assert class_weights("none", SKEWED, 4) is None
    assert class_weights([1.0, 2.0, 3.0, 4.0], SKEWED, 4).tolist() == [1, 2, 3, 4]


def test_class_weight_errors_are_one_line():
    with pytest.raises(ConfigError, match="loss.class_weights: 3 weights for 4 classes"):
        class_weights([1.0, 2.0, 3.0], SKEWED, 4)
    with pytest.raises(ConfigError, match="class index 1 has no train samples"):
        class_weights("balanced", [5, 0, 3], 3)
    with pytest.raises(ConfigError, match="class_counts"):
        class_weights("balanced", [], 3)
    with pytest.raises(ConfigError, match="loss.class_weights: 'balance' is not one of"):
        load_config(None, ["loss.class_weights=balance"])
    with pytest.raises(ConfigError, match="train.label_smoothing: moved to loss.label_smoothing"):
        load_config(None, ["train.label_smoothing=0.1"])
    assert load_config(None, ["loss.class_weights=[1, 2.5]"]).loss.class_weights == [1.0, 2.5]
    # checks across sections fail when the config loads, before a run folder exists
    for extra, words in [(["loss.class_weights=balanced"], "loss.class_weights: cannot be comb"),
                         (["loss.focal_gamma=2"], "loss.focal_gamma: cannot be combined"),
                         (["train.batch_size=7"], "train.batch_size: 7 is odd")]:
        with pytest.raises(ConfigError, match=words):
            load_config(None, ["augment.mixup_alpha=0.8", *extra])
    with pytest.raises(ConfigError, match="early_stop.use_ema: needs an EMA"):
        load_config(None, ["early_stop.use_ema=true"])


# ------------------------------------------------------------------------------- focal loss

@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_is_cross_entropy_at_gamma_zero(weighted, smoothing):
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 4) * 3, torch.randint(0, 4, (16,))
    weight = torch.tensor([0.5, 1.0, 2.0, 4.0]) if weighted else None
    focal = FocalLoss(0.0, weight, smoothing)(logits, targets)
    ce = F.cross_entropy(logits, targets, weight=weight, label_smoothing=smoothing)
    assert focal.item() == pytest.approx(ce.item(), rel=1e-6)
    # gamma > 0 shrinks the loss, most for confidently right samples
    assert FocalLoss(2.0, weight, smoothing)(logits, targets) < focal


def test_criterion_choice_and_mixup_refusals():
    dev = torch.device("cpu")
    crit = build_criterion(LossConfig(class_weights="balanced"), class_counts=SKEWED,
                           num_classes=4, mixing=False, device=dev)
    assert isinstance(crit, torch.nn.CrossEntropyLoss) and crit.weight is not None
    assert isinstance(build_criterion(LossConfig(focal_gamma=2.0), class_counts=SKEWED,
                                      num_classes=4, mixing=False, device=dev), FocalLoss)
    for loss in (LossConfig(class_weights="balanced"), LossConfig(focal_gamma=1.0)):
        with pytest.raises(ConfigError, match="cannot be combined with mixup"):
            build_criterion(loss, class_counts=SKEWED, num_classes=4, mixing=True, device=dev)
    with pytest.raises(ConfigError, match="train.batch_size: 7 is odd"):
        build_mixup(AugmentConfig(mixup_alpha=0.8), LossConfig(), num_classes=4, batch_size=7)


# ------------------------------------------------------------------------------------ mixup

def test_mixup_targets_sum_to_one_and_stop_at_the_off_epoch():
    aug = AugmentConfig(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_off_epoch=2)
    mix = build_mixup(aug, LossConfig(label_smoothing=0.1), num_classes=5, batch_size=8)
    np.random.seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    for epoch in range(3):
        x, y = mix(images.clone(), labels, epoch)
        assert y.shape == (8, 5) and torch.allclose(y.sum(1), torch.ones(8))
        if epoch < 2:  # mixed: inputs changed, targets hold two classes
            # (rows summing to 1 have at most one entry above 0.5 whatever the mixing, so count
            # the entries above the smoothing floor: two in a row mixed with another class)
            assert not torch.equal(x, images) and ((y > 0.1).sum(1) == 2).any()
        else:  # off epoch: images untouched, targets one-hot smoothed
            assert torch.equal(x, images)
            assert torch.allclose(y.max(1).values, torch.full((8,), 0.9 + 0.1 / 5))


# ----------------------------------------------------------------------- balanced sampling

def _labels(loader) -> list[list[int]]:
    return [batch[1].tolist() for batch in loader]


def test_class_balance_flattens_frequencies_keeps_batches_equal_and_resumes(tmp_path):
    write_skewed_shards(str(tmp_path))
    counts = {}
    for balance in (0.0, 1.0):
        cfg = DataConfig(shards=str(tmp_path), image_size=8, num_workers=0, shuffle_buffer=40,
                         class_balance=balance)
        ranks = [build_loader(cfg, DistInfo(rank=r, world_size=2), split="train", train=True,
                              batch_size=8, seed=3) for r in range(2)]
        seen = collections.Counter()
        for epoch in range(2):
            per_rank = []
            for loader in ranks:
                loader.set_epoch(epoch)
                batches = _labels(loader)
                assert all(len(b) == 8 for b in batches)
                per_rank.append(len(batches))
                seen.update(label for b in batches for label in b)
            assert per_rank == [len(ranks[0])] * 2 == [10, 10]  # 160 // (2 * 8)
        counts[balance] = [seen[c] / sum(seen.values()) for c in range(len(SKEWED))]
    # Without balancing the rarest class is ~1/160 of the draws; with it every class that
    # appears in a block is equally likely: all four now get a real share.
    assert counts[0.0][0] > 0.6 and counts[0.0][3] < 0.02
    assert max(counts[1.0]) < 0.45 and min(counts[1.0]) > 0.1
    spread = lambda f: max(f) - min(f)
    assert spread(counts[1.0]) < spread(counts[0.0]) / 2
    # resumable: stopping after k batches and reloading yields exactly the remaining batches
    make = lambda: build_loader(cfg, DistInfo(rank=1, world_size=2), split="train", train=True,
                                batch_size=8, seed=3)
    full = [(l.tolist(), x.sum().item()) for x, l in make()]
    first, k = make(), 3
    it = iter(first)
    for _ in range(k):
        next(it)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert [(l.tolist(), x.sum().item()) for x, l in resumed] == full[k:]
