"""The direct tar reader yields exactly what webdataset's tarfile-based reader yields."""
from __future__ import annotations

import io
import random
import tarfile

import pytest
import webdataset as wds

from ddp_train.shards.tar import CHUNK, TarFormatError, _checksum, tar_samples
from shardgen import write_shards


def _tar(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT, dirs=()) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _webdataset(data: bytes, tmp_path) -> list[dict]:
    path = tmp_path / "x.tar"
    path.write_bytes(data)
    out = []
    for s in wds.tariterators.tarfile_samples([{"url": str(path)}]):
        out.append({k: v for k, v in s.items() if k not in ("__url__", "__local_path__")})
    return out


MEMBERS = [
    ("a.jpg", b"1" * 700), ("a.cls", b"3"), ("a.json", b"{}"),
    ("dir/b.PNG", b"2" * 512), ("dir/b.cls", b"0"),
    ("c.d.e.seg.png", b"x"),  # key "c", extension "d.e.seg.png"
    ("__index__", b"meta"),  # webdataset metadata: skipped
    ("deep/" + "n" * 120 + ".jpg", b"long"), ("deep/" + "n" * 120 + ".cls", b"1"),
    ("empty.txt", b""),
]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_webdataset(fmt, tmp_path):
    members = MEMBERS if fmt != tarfile.USTAR_FORMAT else [
        m for m in MEMBERS if len(m[0]) < 100]  # ustar cannot store the long names
    data = _tar(members, fmt, dirs=["dir"])
    assert list(tar_samples(io.BytesIO(data))) == _webdataset(data, tmp_path)


def test_packed_style_shards(tmp_path):
    manifest = write_shards(str(tmp_path / "ds"), {"train": [5, 7]})
    for url in manifest.urls("train"):
        with open(url, "rb") as f:
            ours = list(tar_samples(f))
        assert ours == _webdataset(open(url, "rb").read(), tmp_path)
        assert len(ours) in (5, 7) and all("png" in s and "cls" in s for s in ours)


def test_bad_tars_raise(tmp_path):
    data = bytearray(_tar(MEMBERS))
    data[10] ^= 0xFF  # corrupt the first header: checksum mismatch
    with pytest.raises(TarFormatError, match="checksum"):
        list(tar_samples(io.BytesIO(bytes(data))))
    truncated = _tar(MEMBERS)[:1200]  # cut inside the first member
    with pytest.raises(TarFormatError, match="ends inside a member"):
        list(tar_samples(io.BytesIO(truncated)))


class _Trickle(io.RawIOBase):
    """A pipe-like stream returning at most 100 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = 100 if n < 0 else min(n, 100)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out


def test_short_reads(tmp_path):
    data = _tar(MEMBERS)
    assert list(tar_samples(_Trickle(data))) == _webdataset(data, tmp_path)


def test_checksum_is_the_byte_sum():
    """The zlib-based checksum equals the tar definition, also for extreme headers."""
    rng = random.Random(0)
    headers = [bytes(512), b"\xff" * 512] + [rng.randbytes(512) for _ in range(200)]
    for h in headers:
        assert _checksum(h) == sum(h[:148]) + 8 * 0x20 + sum(h[156:])


def test_members_across_read_chunks(tmp_path):
    """Members that straddle the reader's chunk boundaries, or are larger than a chunk, come out
    whole; also when the stream returns short reads."""
    rng = random.Random(1)
    members = []
    for i in range(12):  # ~3.5 chunks in all, with random sizes and so random boundaries
        size = CHUNK * 2 + 7 if i == 5 else rng.randrange(1, CHUNK // 3)
        members += [(f"s{i:02d}.bin", rng.randbytes(size)), (f"s{i:02d}.cls", b"%d" % i)]
    data = _tar(members)
    expected = _webdataset(data, tmp_path)
    assert list(tar_samples(io.BytesIO(data))) == expected
    assert list(tar_samples(_Trickle(data))) == expected
