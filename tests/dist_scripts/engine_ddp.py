"""torchrun worker for tests/test_engine.py: a DDP engine must match one process on all the data.

Usage: torchrun --standalone --nproc_per_node=2 tests/dist_scripts/engine_ddp.py RESULT.json

Each rank trains on its own slice with grad_accum=2; after every optimizer step all ranks must
hold the parameters a single process gets from one SGD step on the concatenated data. A comm
hook counts the all-reduces so the test can check that off-boundary micro-batches skip them.
Rank 0 writes the findings as JSON; the test asserts on them.
"""
import copy
import json
import sys

import torch
import torch.distributed as tdist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from ddp_train.config import EngineConfig
from ddp_train.dist import all_gather_objects, setup, teardown
from ddp_train.engine import build_engine

STEPS, ACCUM, BATCH = 2, 2, 4  # per rank and micro-batch


def main(result_path: str) -> None:
    dist = setup(device="cpu", backend="gloo")
    world, rank = dist.world_size, dist.rank
    torch.manual_seed(rank)  # different init per rank: DDP must broadcast rank 0's weights
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    engine = build_engine(EngineConfig(), model, torch.optim.SGD(model.parameters(), lr=0.5),
                          dist, grad_accum=ACCUM)
    reference = copy.deepcopy(engine.unwrapped)  # after DDP's broadcast: rank 0's weights
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.5)

    calls = [0]

    def counting_allreduce(state, bucket):
        calls[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    engine.model.register_comm_hook(state=None, hook=counting_allreduce)

    # The same global data on every rank; each rank takes its slice of every micro-batch.
    g = torch.Generator().manual_seed(123)
    xs = torch.randn(STEPS, ACCUM, world * BATCH, 6, generator=g)
    ys = torch.randint(0, 3, (STEPS, ACCUM, world * BATCH), generator=g)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)

    allreduces, grad_norms, ref_norms, ranks_diff, ref_diff = [], [], [], [], []
    for step in range(STEPS):
        for micro in range(ACCUM):
            before = calls[0]
            x, y = engine.to_device(xs[step, micro, mine]), engine.to_device(ys[step, micro, mine])
            with engine.autocast():
                loss = F.cross_entropy(engine.model(x), y)
            engine.backward(loss)
            allreduces.append(calls[0] - before)
            out = engine.step()
        grad_norms.append(out.grad_norm)

        # Reference: one process, one step on all ranks' samples of the whole window (mean loss).
        loss = F.cross_entropy(reference(xs[step].flatten(0, 1)), ys[step].flatten())
        loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), float("inf"))
        ref_norms.append(ref_norm.item())
        ref_opt.step()
        ref_opt.zero_grad()

        flat = torch.cat([p.detach().flatten() for p in engine.unwrapped.parameters()])
        ref_flat = torch.cat([p.detach().flatten() for p in reference.parameters()])
        ref_diff.append((flat - ref_flat).abs().max().item())
        gathered = all_gather_objects(dist, flat)
        ranks_diff.append(max((t - gathered[0]).abs().max().item() for t in gathered))

    keys = list(engine.state_dict()["model"])
    if dist.is_main:
        with open(result_path, "w") as f:
            json.dump({"engine": engine.name, "world_size": world,
                       "allreduces_per_micro_batch": allreduces, "grad_norms": grad_norms,
                       "reference_grad_norms": ref_norms, "max_diff_vs_reference": max(ref_diff),
                       "max_diff_between_ranks": max(ranks_diff),
                       "clean_keys": bool(keys) and not any(k.startswith("module.") for k in keys)},
                      f)
    tdist.barrier()
    teardown(dist)


if __name__ == "__main__":
    main(sys.argv[1])
