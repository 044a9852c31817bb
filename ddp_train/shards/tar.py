"""Read WebDataset samples from a tar stream by parsing its 512-byte headers directly.

Hand-written on purpose: webdataset reads shards through Python's ``tarfile`` module, which
costs ~0.09 ms per member here (3 members per sample: ``jpg``, ``cls``, ``json``) — a quarter
of the per-image work of a 64 px pipeline (bench/loader.py, docs/benchmarks.md). This parser
reads the stream in 1 MiB chunks and slices headers and members out of them; with the checksum
computed by zlib it costs ~3.5 us per member instead of tarfile's ~90 (and ~6 for a first
version that read each header, member and padding separately and summed the header in Python,
bench numbers in docs/benchmarks.md). Sample
grouping follows webdataset exactly: consecutive members sharing the part of the path before the
first dot of the file name form one sample (``base_plus_ext``'s regex), extensions lower-cased,
``__key__`` set, ``__*__`` metadata files skipped. Opening the stream (local path, URL,
``pipe:``) stays with webdataset's ``gopen``.
"""
from __future__ import annotations

import re
import zlib
from typing import BinaryIO, Iterator

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
CHUNK = 1 << 20  # bytes per read: ~130 members of 64 px training JPEGs, one syscall
GZIP_MAGIC = b"\x1f\x8b"  # a .tar.gz: named in the error instead of a checksum mismatch
REGULAR = (b"0", b"\0", b"7")  # regular file, old-style regular file, contiguous file
META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: e.g. "__index__" files
# webdataset's base_plus_ext pattern, compiled once (it calls re.match with the string each time)
KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


class TarFormatError(ValueError):
    """The stream is not a readable tar (bad checksum, truncated member)."""


def _read_upto(stream: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at the end of the stream."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = bytearray(data)  # pipes and sockets may return short reads: collect them
    while len(parts) < n:
        more = stream.read(n - len(parts))
        if not more:
            break
        parts += more
    return bytes(parts)


def _octal(field: bytes) -> int:
    if field[0] == 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.strip(b"\0 ")
    return int(text, 8) if text else 0


def _checksum(header: bytes) -> int:
    """The tar checksum of ``header``: the sum of its bytes, the checksum field read as spaces.

    Python's ``sum(header)`` takes ~3 us per header. adler32's low 16 bits are 1 + the byte sum
    modulo 65521, which is the exact sum for runs of at most 256 bytes (256 * 255 < 65521):
    three runs around the 8-byte checksum field give the same number ~6x faster.
    """
    return ((zlib.adler32(header[:148]) & 0xFFFF) + (zlib.adler32(header[156:356]) & 0xFFFF)
            + (zlib.adler32(header[356:]) & 0xFFFF) - 3 + 8 * 0x20)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header (``"%d path=%s\\n"`` records)."""
    for record in data.split(b"\n"):
        _, _, kv = record.partition(b" ")
        if kv.startswith(b"path="):
            return kv[5:].decode("utf-8")
    return None


def tar_members(stream: BinaryIO, strict: bool = False) -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every regular file in a tar stream, in order.

    ``strict`` (``ddp-shards index``) also fails a stream that ends without the end-of-archive
    zero block: a shard cut at a member boundary. The loader is lenient there; it reads only
    as many samples as the manifest counted.
    """
    buf, pos = b"", 0  # the unparsed input is buf[pos:]; refilled a chunk at a time
    long_name = None  # set by a pax 'x' or GNU 'L' header for the next member
    started = False  # a header was read: an empty stream is "not a tar", not "truncated"
    while True:
        if len(buf) - pos < BLOCK:
            buf, pos = buf[pos:] + _read_upto(stream, CHUNK), 0
        header = buf[pos:pos + BLOCK]
        if header == ZERO_BLOCK:  # end-of-archive blocks
            return
        if len(header) < BLOCK:
            if strict:
                raise TarFormatError("tar ends without its end-of-archive block (truncated)"
                                     if header or started else "empty file, not a tar")
            return
        if not started and header[:2] == GZIP_MAGIC:
            raise TarFormatError("gzip-compressed tar: shards are read uncompressed; gunzip "
                                 "them, or read them through a root like 'pipe:gzip -dc DIR/{}'")
        if _octal(header[148:156]) != _checksum(header):
            raise TarFormatError("tar header checksum mismatch")
        size = _octal(header[124:136])
        started = True
        need = BLOCK + -(-size // BLOCK) * BLOCK  # header + member padded to whole blocks
        if len(buf) - pos < need:
            buf, pos = buf[pos:] + _read_upto(stream, max(CHUNK, need - (len(buf) - pos))), 0
            if len(buf) < need:
                raise TarFormatError(f"tar ends inside a member of {size} bytes, "
                                     f"{max(0, len(buf) - pos - BLOCK)} of them there "
                                     "(truncated)")
        data = buf[pos + BLOCK:pos + BLOCK + size]
        pos += need
        kind = header[156:157]
        if kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8")
        elif kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind in REGULAR:
            name = long_name
            if name is None:
                name = header[:100].rstrip(b"\0").decode("utf-8")
                if header[345] and header[257:262] == b"ustar":  # ustar path prefix
                    name = header[345:500].rstrip(b"\0").decode("utf-8") + "/" + name
            long_name = None
            yield name, data
        else:  # directories, links, global pax headers: not sample data
            long_name = None


def tar_samples(stream: BinaryIO, strict: bool = False) -> Iterator[dict]:
    """Samples of a WebDataset tar: ``{"__key__": key, ext: bytes, ...}`` per key, in order.

    ``strict``: see :func:`tar_members`.
    """
    sample: dict | None = None
    for path, data in tar_members(stream, strict):
        match = KEY_EXT.match(path)
        if match is None or META.match(path):
            continue
        key, ext = match.groups()
        if sample is not None and sample["__key__"] != key:
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key}
        sample[ext.lower()] = data
    if sample is not None:
        yield sample
