"""The bundled demo data: scikit-learn's handwritten digits, packed to shards on first use.

1,797 real 8x8 grey images in 10 classes ship inside scikit-learn, so the default run needs no
download. They are written as PNG files into a temporary class-per-folder tree and packed by the
same packer users run on their own images.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from PIL import Image

from .dist import DistInfo, barrier
from .shards.manifest import INFO_NAME
from .shards.pack import pack

DEFAULT_ROOT = "shards/digits"


def write_digits_folder(folder: str) -> None:
    """Write every digit as ``folder/<label>/<index>.png`` (8x8 greyscale, 0-16 scaled to 0-255)."""
    from sklearn.datasets import load_digits  # only the demo needs scikit-learn

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        os.makedirs(os.path.join(folder, str(label)), exist_ok=True)
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, str(label), f"{i:04d}.png"))


def ensure_digits(root: str, dist: DistInfo) -> None:
    """Pack the digits into ``root`` unless a manifest is already there (rank 0 packs, all wait)."""
    if dist.is_main and not os.path.exists(os.path.join(root, INFO_NAME)):
        with tempfile.TemporaryDirectory() as tmp:
            write_digits_folder(tmp)
            # Several shards per split, so even the demo exercises the multi-shard stream.
            pack(tmp, root, val_fraction=0.2, test_fraction=0.1, seed=0, shard_size=250,
                 workers=min(2, os.cpu_count() or 1), progress="lines")
    barrier(dist)
