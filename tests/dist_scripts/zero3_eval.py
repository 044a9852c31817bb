"""torchrun worker (2 ranks): exact evaluation through a DeepSpeed ZeRO-3 model.

Usage: zero3_eval.py SHARDS RESULT.json [--no-padding]

ZeRO-3 partitions every weight (persistence threshold 0), so each forward all-gathers the
weights layer by layer: a collective. 359 val samples in batches of 179 give one rank two batches
and the other one. ``evaluate`` must pad the other with a discarded forward, or the busier rank
waits forever in its second forward (``--no-padding`` shows it: the collective times out).
"""
import json
import sys

import timm
import torch

from ddp_train.config import DataConfig, EngineConfig, OptimConfig
from ddp_train.data import build_loader
from ddp_train.dist import all_gather_objects, setup, teardown
from ddp_train.engine import build_engine
from ddp_train.metrics import evaluate
from ddp_train.optim import build_optimizer

shards, out = sys.argv[1:3]
dist = setup(device="cpu", backend="gloo", timeout_s=30)
try:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    block = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine = build_engine(EngineConfig(name="deepspeed", deepspeed=block), model,
                          build_optimizer(OptimConfig(), model), dist, batch_size=4)
    loader = build_loader(DataConfig(shards=shards, num_workers=0), dist, split="val",
                          train=False, batch_size=179, seed=0)
    result = evaluate(engine.unwrapped, loader, torch.nn.CrossEntropyLoss(), num_classes=10,
                      class_names=None, device=dist.device, dist=dist,
                      equal_forwards=engine.collective_forward and "--no-padding" not in sys.argv)
    batches = sorted(all_gather_objects(dist, len(loader)))  # per-rank eval batch counts
    if dist.is_main:
        with open(out, "w") as f:
            json.dump({"count": result["count"], "batches": batches,
                       "collective_forward": engine.collective_forward}, f)
finally:
    teardown(dist)
