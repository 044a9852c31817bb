"""Run under torchrun: read every layout in argv[1] (a JSON list of dataset roots) with the
train and eval loaders, with 0 and 2 workers, and record what this rank saw in argv[2]-rank.json.

Per layout and worker count the record holds: train batch ids for 2 epochs, len(loader), the
ids of a resumed train stream (resume point chosen by the parent), and the eval ids."""
import hashlib
import json
import sys

import torch

from ddp_train.config import DataConfig
from ddp_train.data import build_loader
from ddp_train.dist import all_gather_objects, all_reduce_sum, setup, teardown


def signature(batch):
    images, labels = batch
    return [labels.tolist(), hashlib.md5(images.numpy().tobytes()).hexdigest()]


def main():
    jobs = json.load(open(sys.argv[1]))
    dist = setup(device="cpu", backend="gloo", timeout_s=120)
    out = []
    try:
        for job in jobs:
            for workers in (0, 2):
                cfg = DataConfig(shards=job["root"], image_size=8, num_workers=workers,
                                 shuffle_buffer=job["buffer"])
                make = lambda: build_loader(cfg, dist, split="train", train=True,
                                            batch_size=job["batch"], seed=3)
                loader = make()
                epochs = []
                for _ in range(2):
                    epochs.append([])
                    for b in loader:
                        epochs[-1].append(signature(b))
                        # what DDP does every step: a rank with one batch less would hang here
                        all_reduce_sum(dist, torch.ones(1))
                resumed = make()
                n = len(loader)
                j = job["resume_at"] % (2 * n)
                resumed.load_state_dict(dict(loader.state_dict(), epoch=j // n, batches=j % n))
                rest = [signature(b) for b in resumed]
                if j < n:
                    rest += [signature(b) for b in resumed]
                val = build_loader(cfg, dist, split="val", train=False, batch_size=job["batch"],
                                   seed=3)
                val_ids = [i for b in val for i in b[1].tolist()]
                out.append(dict(root=job["root"], workers=workers, len=n, epochs=epochs,
                                resume_at=j, resumed=rest, val=val_ids, val_len=len(val)))
        # a collective per rank at the end: if a rank had hung or died, this would time out
        all_gather_objects(dist, len(out))
    finally:
        teardown(dist)
    json.dump(out, open(f"{sys.argv[2]}-{dist.rank}.json", "w"))


if __name__ == "__main__":
    main()
