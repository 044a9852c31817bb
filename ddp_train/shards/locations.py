"""Where a dataset's files are: a local folder, a URL prefix, or a ``pipe:`` template.

Shared by the manifest (shard locations) and :mod:`.sources` (which files form a split), so
that neither imports the other.
"""
from __future__ import annotations

import hashlib
import os
from typing import BinaryIO


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


def open_stream(location: str) -> BinaryIO:
    """A shard's (or manifest's) byte stream: local files directly, URLs and ``pipe:`` through
    webdataset's ``gopen`` as the loader opens them (imported only then: it imports torch)."""
    if not is_remote(location):
        return open(location, "rb")
    import webdataset as wds

    return wds.gopen(location, "rb")


class HashingReader:
    """A read-only stream that hashes (sha256) and counts every byte read through it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.digest, self.bytes = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> str:
        """Read (and hash) what is left; return the hex digest of everything read."""
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()
