"""Tiny on-disk image folders for tests: real JPEG/PNG files plus a few deliberately broken ones."""
from __future__ import annotations

import os
import random

from PIL import Image

# File name -> the reason word the packer must log for it (see ddp_train.shards.pack).
CORRUPT_FILES = {
    "truncated.jpg": "corrupt",  # a real JPEG cut in half: decodes only with LOAD_TRUNCATED_IMAGES
    "empty.jpg": "empty",  # 0 bytes
    "notes.jpg": "not an image",  # a text file with an image extension
}


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    """A deterministic RGB noise image (noise so JPEG data is long enough to truncate)."""
    w, h = size
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(w * h * 3))


def make_image_folder(root: str, classes: dict[str, int] | None = None,
                      size: tuple[int, int] = (24, 20), corrupt: bool = True) -> list[str]:
    """Write an ImageFolder tree ``root/<class>/<class>_NNN.{jpg,png}``; return the broken files.

    ``classes`` maps class name -> number of good images (default ``{"a": 6, "b": 4}``); images
    alternate JPEG/PNG, are ``size`` = (width, height) pixels, and are byte-identical for the same
    arguments. With ``corrupt=True`` the keys of ``CORRUPT_FILES`` (a truncated JPEG, a 0-byte file,
    a text file named .jpg) are added, spread over the classes in order. Returns the absolute
    paths of those broken files (empty list when ``corrupt=False``).
    """
    classes = classes if classes is not None else {"a": 6, "b": 4}
    names = list(classes)
    for c, (name, count) in enumerate(classes.items()):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            ext = "jpg" if i % 2 == 0 else "png"
            _noise(size, seed=1000 * c + i).save(os.path.join(root, name, f"{name}_{i:03d}.{ext}"))
    if not corrupt:
        return []
    broken = []
    for i, fname in enumerate(CORRUPT_FILES):
        path = os.path.abspath(os.path.join(root, names[i % len(names)], fname))
        broken.append(path)
        if fname == "truncated.jpg":
            full = os.path.join(root, "_full.jpg")
            _noise((64, 64), seed=-1).save(full, quality=95)
            with open(full, "rb") as f:
                data = f.read()
            os.remove(full)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
        elif fname == "empty.jpg":
            open(path, "wb").close()
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write("this is not an image\n")
    return broken
