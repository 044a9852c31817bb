"""Extra per-sample members stored next to the image: ``<name>.npy`` arrays, ``<name>.json`` records.

A CSV given to the packer may name extra columns (``--extras sensor,env``). Each cell is a path to
a ``.npy`` file (e.g. a sensor window, stored as float32 ``<name>.npy``), a path to a ``.json``
file, or an inline JSON number / list / object of numbers (stored as ``<name>.json``). Every
sample of a dataset must have the same shape (arrays, lists) or keys (objects) for a column: the
manifest records that once (``extras``), and the loader turns each member into a float32 tensor
of that shape. Relative paths are relative to the CSV's folder.
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import numpy as np

# Column names that already mean something in a CSV or a sample.
RESERVED = {"path", "label", "split", "image", "cls", "json", "jpg", "png", "webp", "txt"}


def check_names(names: list[str]) -> None:
    """ValueError unless every extra name is a plain identifier that is not reserved."""
    for name in names:
        if not name.isidentifier() or name.lower() != name or name in RESERVED:
            raise ValueError(f"extra column {name!r}: use a lower-case identifier other than "
                             f"{', '.join(sorted(RESERVED))}")


def resolve(value: str, base: str) -> str:
    """A cell as the packer reads it: ``.npy``/``.json`` paths made absolute, else the text."""
    value = (value or "").strip()
    if value.lower().endswith((".npy", ".json")):
        return os.path.join(base, value)
    return value


def _numbers(values: list, where: str) -> list[float]:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
        raise ValueError(f"{where}: values must be finite numbers")
    return [float(v) for v in values]


def encode(name: str, value: str) -> tuple[str, bytes, dict[str, Any]]:
    """``(member name, bytes, spec)`` for one cell; ValueError with the reason when unusable.

    ``spec`` is ``{"member", "shape"}`` (arrays, lists, numbers) or ``{"member", "keys"}``
    (objects: the loader orders the values by these keys).
    """
    if not value:
        raise ValueError(f"{name}: empty cell")
    if value.lower().endswith(".npy"):
        try:
            array = np.load(value, allow_pickle=False)
        except FileNotFoundError:
            raise ValueError(f"{name}: missing file {value}") from None
        except (OSError, ValueError) as e:
            raise ValueError(f"{name}: unreadable .npy {value}: {e}") from None
        if array.dtype.kind not in "biuf" or not np.isfinite(array).all():
            raise ValueError(f"{name}: {value} must hold finite numbers")
        buf = io.BytesIO()
        np.save(buf, array.astype(np.float32))
        return f"{name}.npy", buf.getvalue(), {"member": f"{name}.npy", "shape": list(array.shape)}
    try:
        if value.lower().endswith(".json"):
            with open(value, encoding="utf-8") as f:
                record = json.load(f)
        else:
            record = json.loads(value)
    except FileNotFoundError:
        raise ValueError(f"{name}: missing file {value}") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: not a .npy/.json path nor inline JSON ({e})") from None
    member = f"{name}.json"
    if isinstance(record, dict):
        keys = sorted(record)
        _numbers([record[k] for k in keys], name)
        spec: dict[str, Any] = {"member": member, "keys": keys}
    else:
        values = record if isinstance(record, list) else [record]
        spec = {"member": member, "shape": [len(_numbers(values, name))]}
    return member, json.dumps(record, sort_keys=True).encode(), spec


def mismatch(spec: dict, first: dict) -> str:
    """Why ``spec`` differs from the dataset's ``first`` spec of the same column ('' if not)."""
    if spec == first:
        return ""
    what = "keys" if "keys" in first or "keys" in spec else "shape"
    return (f"{spec['member']}: {what} {spec.get(what)} differs from {first.get(what)} of "
            f"earlier samples")


def decode(data: bytes, spec: dict):
    """The float32 tensor of one stored member (``spec`` from the manifest)."""
    import torch  # the packer side of this module does not need torch

    if spec["member"].endswith(".npy"):
        return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32))
    record = json.loads(data)
    if "keys" in spec:
        values = [record[k] for k in spec["keys"]]
    else:
        values = record if isinstance(record, list) else [record]
    return torch.tensor(values, dtype=torch.float32)
