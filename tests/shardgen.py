"""Write synthetic shard datasets with arbitrary shard layouts for loader tests.

Every sample's ``cls`` is its unique id (0..N-1 within the split, offset per split), so a test
can tell exactly which samples a loader yielded. Images are tiny real PNGs.
"""
from __future__ import annotations

import io
import os
import random

import numpy as np
import webdataset as wds
from PIL import Image

from ddp_train.shards.manifest import Manifest, SplitInfo, write_manifest


def png_bytes(value: int, size: int = 8) -> bytes:
    """A small RGB PNG whose pixels depend on ``value``."""
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: str, layout: dict[str, list[int]], size: int = 8,
                 corrupt: tuple[int, ...] = ()) -> Manifest:
    """Write ``root/{split}-NNNNNN.tar`` with the given samples per shard; ids in ``corrupt`` get
    undecodable image bytes. Returns the manifest (also written to ``root/_info.json``)."""
    os.makedirs(root, exist_ok=True)
    splits = {}
    next_id = 0
    for split, lengths in layout.items():
        names = []
        for i, n in enumerate(lengths):
            name = f"{split}-{i:06d}.tar"
            with wds.TarWriter(os.path.join(root, name)) as w:
                for _ in range(n):
                    img = b"not an image" if next_id in corrupt else png_bytes(next_id, size)
                    w.write({"__key__": f"s{next_id:07d}", "png": img, "cls": next_id})
                    next_id += 1
            names.append(name)
        splits[split] = SplitInfo(split, sum(lengths), names, list(lengths))
    manifest = Manifest(root=root, classes=[str(i) for i in range(next_id)], splits=splits)
    write_manifest(manifest, root)
    return manifest


def random_layout(rng: random.Random, total: int, max_shards: int) -> list[int]:
    """``total`` samples cut into 1..max_shards shards of random (uneven) sizes, some tiny."""
    k = rng.randint(1, min(max_shards, total))
    cuts = sorted(rng.sample(range(1, total), k - 1)) if k > 1 else []
    return [b - a for a, b in zip([0] + cuts, cuts + [total])]
