"""Where a dataset's files are: a local folder, a URL prefix, or a ``pipe:`` template.

Shared by the manifest (shard locations) and :mod:`.sources` (which files form a split), so
that neither imports the other.
"""
from __future__ import annotations

import os


def join(root: str, name: str) -> str:
    """Location of file ``name`` of a dataset whose root is ``root``.

    ``root`` is a local folder, a URL prefix webdataset opens (``http://...``), or a template
    holding ``{}`` for the file name, e.g. ``pipe:aws s3 cp s3://bucket/ds/{} -`` for object
    stores (webdataset runs the command and reads its stdout).
    """
    if "{}" in root:
        return root.replace("{}", name)
    if root.startswith("pipe:"):
        raise ValueError(f"a pipe: shard root needs a {{}} where the file name goes: {root!r}")
    if "://" in root:
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def is_remote(root: str) -> bool:
    """True when ``root`` is opened through webdataset (URL, pipe: or template), not the OS."""
    return "{}" in root or "://" in root or root.startswith("pipe:")
