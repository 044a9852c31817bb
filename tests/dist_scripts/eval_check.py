"""Under torchrun (any nproc): evaluate checkpoint argv[1] on the val split of shards argv[2];
rank 0 writes the metrics to argv[3].json. 1 rank and 2 ranks must agree exactly."""
import json
import sys

import timm
import torch

from ddp_train import checkpoint
from ddp_train.config import DataConfig
from ddp_train.data import build_loader
from ddp_train.dist import setup, teardown
from ddp_train.metrics import evaluate


def main():
    path, shards, out = sys.argv[1:4]
    dist = setup(device="cpu", backend="gloo", timeout_s=120)
    try:
        meta = checkpoint.read_meta(path)
        model = timm.create_model(meta["model_name"], num_classes=meta["num_classes"])
        model.load_state_dict(checkpoint.load(path)["model"])
        loader = build_loader(DataConfig(shards=shards, num_workers=2), dist, split="val",
                              train=False, batch_size=16, seed=0)
        result = evaluate(model, loader, torch.nn.CrossEntropyLoss(),
                          num_classes=meta["num_classes"], class_names=meta["classes"],
                          device=dist.device, dist=dist)
    finally:
        teardown(dist)
    if dist.is_main:
        json.dump(result, open(out + ".json", "w"))


if __name__ == "__main__":
    main()
