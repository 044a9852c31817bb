"""A packed image folder and a tiny run trained on it in-process: the fixture behind the
inference and export tests."""
from __future__ import annotations

import os

import torch

from ddp_train.config import load_config
from ddp_train.dist import DistInfo
from ddp_train.shards.pack import pack
from ddp_train.trainer import train
from helpers_images import make_image_folder


def pack_and_train(root: str, classes: dict[str, int], size: tuple[int, int],
                   overrides: list[str]) -> dict:
    """Pack ``classes`` images of ``size`` (a quarter each to val and test) and train
    ``model.name=test_resnet`` at 32 px, batch 4, on one CPU thread, plus ``overrides``.

    Returns ``{"images", "shards", "dir", "result"}`` (folders, and what ``train`` returned).
    """
    images, shards, run_dir = (os.path.join(root, n) for n in ("images", "shards", "run"))
    make_image_folder(images, classes, size=size, corrupt=False)
    pack(images, shards, workers=1, progress="none", val_fraction=0.25, test_fraction=0.25)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.shards={shards}", f"run.path={run_dir}",
                             "model.name=test_resnet", "data.image_size=32",
                             "data.num_workers=0", "train.batch_size=4", "log.progress=none",
                             *overrides])
    result = train(cfg, DistInfo())
    return {"images": images, "shards": shards, "dir": run_dir, "result": result}
