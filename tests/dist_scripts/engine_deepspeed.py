"""torchrun worker for tests/test_deepspeed.py: DeepSpeed ZeRO 0/2/3 must train like DDP.

Usage: torchrun --standalone --nproc_per_node=2 tests/dist_scripts/engine_deepspeed.py RESULT.json

Every variant builds the same timm ``test_resnet`` (BatchNorm) from the same seed with ddp-train's
own optimizer (timm AdamW) and LR schedule (warmup: the lr changes every update), then runs the
trainer's micro-batch loop (to_device / autocast / backward / step) with grad_accum=2 and
clipping on the same global batches, each rank on its slice. Rank 0 writes per-update losses
(averaged over ranks), grad norms and lrs per variant as JSON; the test compares them with DDP's.
"""
import json
import sys

import timm
import torch
import torch.distributed as tdist
import torch.nn.functional as F

from ddp_train.config import EngineConfig, OptimConfig, ScheduleConfig
from ddp_train.dist import all_reduce_sum, setup, teardown
from ddp_train.engine import build_engine
from ddp_train.optim import build_optimizer, build_scheduler, current_lr

UPDATES, ACCUM, BATCH, CLIP = 4, 2, 4, 1.0  # BATCH per rank and micro-batch
VARIANTS = {  # name -> (engine.name, precision, engine.deepspeed)
    "ddp": ("ddp", "fp32", {}),
    "zero0": ("deepspeed", "fp32", {"zero_optimization": {"stage": 0}}),
    "zero2": ("deepspeed", "fp32", {"zero_optimization": {"stage": 2}}),
    "zero3": ("deepspeed", "fp32", {"zero_optimization": {"stage": 3}}),
    "zero2_bf16": ("deepspeed", "bf16", {"zero_optimization": {"stage": 2}}),
    # ZeRO-Offload: optimizer states on the CPU, stepped by the client (timm) optimizer.
    "zero2_offload": ("deepspeed", "fp32", {"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}),
}


def run(dist, name: str, precision: str, block: dict, xs, ys) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    optimizer = build_optimizer(OptimConfig(lr=1e-2), model)
    engine = build_engine(EngineConfig(name=name, precision=precision, deepspeed=block), model,
                          optimizer, dist, batch_size=BATCH, grad_accum=ACCUM, clip_grad=CLIP)
    scheduler = build_scheduler(ScheduleConfig(warmup_steps=2), engine.optimizer,
                                updates_per_epoch=UPDATES, total_updates=UPDATES)
    mine = slice(dist.rank * BATCH, (dist.rank + 1) * BATCH)
    losses, norms, lrs = [], [], []
    for update in range(UPDATES):
        lrs.append(current_lr(engine.optimizer))
        window = torch.zeros(())
        for micro in range(ACCUM):
            x = engine.to_device(xs[micro, mine])
            with engine.autocast():
                loss = F.cross_entropy(engine.model(x), ys[micro, mine])
            engine.backward(loss)
            window += loss.detach().float()
            out = engine.step()
            assert (out is None) == (micro < ACCUM - 1), (name, update, micro)
        losses.append(all_reduce_sum(dist, window).item() / ACCUM / dist.world_size)
        norms.append(out.grad_norm)
        scheduler.step_update(update + 1)
    return {"engine": engine.name, "losses": losses, "grad_norms": norms, "lrs": lrs,
            "param_dtype": str(next(engine.unwrapped.parameters()).dtype)}


def main(result_path: str) -> None:
    dist = setup(device="cpu", backend="gloo")
    # The same global data on every rank; every update revisits it, so the loss must fall.
    g = torch.Generator().manual_seed(123)
    xs = torch.randn(ACCUM, dist.world_size * BATCH, 3, 32, 32, generator=g)
    ys = torch.randint(0, 3, (ACCUM, dist.world_size * BATCH), generator=g)
    results = {v: run(dist, *spec, xs, ys) for v, spec in VARIANTS.items()}
    if dist.is_main:
        with open(result_path, "w") as f:
            json.dump({"world_size": dist.world_size, **results}, f)
    tdist.barrier()
    teardown(dist)


if __name__ == "__main__":
    main(sys.argv[1])
