"""ddp-shards pack/info/verify: the shards, the manifest and the CLI contract."""
from __future__ import annotations

import collections
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from ddp_train.shards.__main__ import main
from ddp_train.shards.manifest import INFO_NAME, PROBLEMS_NAME, load_manifest
from ddp_train.shards.pack import PackSettings, pack
from helpers_images import CORRUPT_FILES, make_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = {"a": 20, "b": 12, "c": 8}  # good images per class written by make_image_folder


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m ddp_train.shards ARGS`` from the repo, as a user would."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ddp_train.shards", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def read_split(root: str, split: str) -> list[list[dict]]:
    """Every sample of a split, per shard, read back with webdataset."""
    manifest = load_manifest(root)
    return [list(wds.WebDataset(url, shardshuffle=False)) for url in manifest.urls(split)]


def shard_keys(root: str) -> dict[str, list[str]]:
    """Sample keys in order, per shard file name."""
    manifest = load_manifest(root)
    return {f: [s["__key__"] for s in wds.WebDataset(os.path.join(root, f), shardshuffle=False)]
            for split in manifest.splits.values() for f in split.filenames}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder with 3 broken files, a BMP (re-encoded to PNG) and one image to shrink."""
    root = str(tmp_path_factory.mktemp("src") / "imgs")
    broken = make_image_folder(root, GOOD, size=(24, 20), corrupt=True)
    Image.new("RGB", (24, 20), "red").save(os.path.join(root, "c", "c_bmp.bmp"))
    Image.new("RGB", (80, 50), "blue").save(os.path.join(root, "b", "b_big.jpg"))
    return root, broken


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    """The folder packed once through the API: (manifest, output folder, broken files)."""
    src, broken = folder
    out = str(tmp_path_factory.mktemp("out") / "imgs")
    settings = PackSettings(shard_size=8, resize=40, workers=2, progress="none")
    manifest = pack(src, out, settings=settings)
    return manifest, out, broken


def test_manifest_fields(folder, packed):
    manifest, out, broken = packed
    assert manifest.root == out and load_manifest(out).splits == manifest.splits
    doc = json.load(open(os.path.join(out, INFO_NAME)))
    assert doc["classes"] == ["a", "b", "c"] and doc["num_classes"] == 3
    assert doc["problematic"] == manifest.problematic == len(broken) == 3
    assert set(doc["splits"]) == {"train", "val", "test"}
    for name, split in doc["splits"].items():
        assert split["name"] == name
        assert split["num_samples"] == sum(split["shard_lengths"]) == sum(split["class_counts"])
        assert all(re.fullmatch(rf"{name}-\d{{6}}\.tar", f) for f in split["filenames"])
        assert all(os.path.isfile(os.path.join(out, f)) for f in split["filenames"])
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in split["sha256"])
        assert len(split["sha256"]) == len(split["filenames"])
        assert max(split["shard_lengths"]) <= 8
    assert doc["splits"]["train"]["filenames"][0] == "train-000000.tar"
    good = [GOOD["a"], GOOD["b"] + 1, GOOD["c"] + 1]  # + b_big.jpg, + c_bmp.bmp
    assert [sum(s["class_counts"][i] for s in doc["splits"].values()) for i in range(3)] == good
    p = doc["pack"]
    assert (p["seed"], p["val_fraction"], p["test_fraction"]) == (0, 0.1, 0.1)
    assert (p["shard_size"], p["max_shard_bytes"], p["resize"]) == (8, 256 << 20, 40)
    assert p["workers"] == 2
    assert p["source"] == folder[0]
    assert p["created"] and p["ddp_train_version"]


def test_stratified_per_class(packed):
    manifest, _, broken = packed
    broken_per_class = collections.Counter(os.path.basename(os.path.dirname(p)) for p in broken)
    # Splits are drawn before decoding: n counts the good, extra and broken files of a class.
    files = [GOOD["a"] + 1, GOOD["b"] + 2, GOOD["c"] + 2]
    for i, (label, n) in enumerate(zip(manifest.classes, files)):
        for name in ("val", "test"):
            got = manifest.splits[name].class_counts[i]
            expected = int(n * 0.1 + 0.5)
            assert expected - broken_per_class[label] <= got <= expected, (label, name)


def test_problematic_log_lists_exactly_the_broken_files(packed):
    _, out, broken = packed
    rows = [json.loads(line) for line in open(os.path.join(out, PROBLEMS_NAME))]
    assert sorted(r["path"] for r in rows) == sorted(broken)
    for row in rows:
        assert row["reason"].startswith(CORRUPT_FILES[os.path.basename(row["path"])]), row
        assert row["label"] == os.path.basename(os.path.dirname(row["path"]))


def test_every_sample_reads_back(packed):
    manifest, out, _ = packed
    keys = set()
    for name, split in manifest.splits.items():
        shards = read_split(out, name)
        assert [len(s) for s in shards] == split.shard_lengths
        for sample in (s for shard in shards for s in shard):
            key = sample["__key__"]
            assert key.startswith(name + "_") and "." not in key and key not in keys
            keys.add(key)
            meta = json.loads(sample["json"])
            exts = [e for e in ("jpg", "png", "webp") if e in sample]
            assert len(exts) == 1, sample.keys()
            data = sample[exts[0]]
            img = Image.open(io.BytesIO(data))
            img.load()
            assert int(sample["cls"]) == manifest.classes.index(meta["label"])
            assert meta["label"] == os.path.basename(os.path.dirname(meta["path"]))
            if meta["path"].endswith("b_big.jpg"):  # shrunk to --resize 40, original size kept
                assert (exts[0], img.size, meta["size"]) == ("jpg", (40, 25), [80, 50])
            elif meta["path"].endswith(".bmp"):  # BMP is re-encoded as lossless PNG
                assert (exts[0], img.format, img.size) == ("png", "PNG", (24, 20))
            else:  # JPEG/PNG below the resize limit: the original bytes, untouched
                assert data == open(meta["path"], "rb").read()
                assert exts[0] == os.path.splitext(meta["path"])[1][1:]
                assert meta["size"] == [24, 20]
    assert len(keys) == sum(GOOD.values()) + 2


def test_shards_mix_classes(packed):
    _, out, _ = packed
    first = read_split(out, "train")[0]
    assert len({int(s["cls"]) for s in first}) > 1


def test_timm_reader_reads_train_split(packed):
    from timm.data.readers.reader_wds import ReaderWds

    manifest, out, _ = packed
    reader = ReaderWds(root=out, split="train", is_training=False)
    samples = list(reader)  # an iterable reader: yields (PIL image, target)
    train = manifest.splits["train"]
    assert len(samples) == train.num_samples
    assert collections.Counter(t for _, t in samples) == dict(enumerate(train.class_counts))
    assert all(img.mode == "RGB" and min(img.size) > 0 for img, _ in samples)


def test_same_seed_same_bytes_any_worker_count(tmp_path, capsys):
    src = str(tmp_path / "clean")
    make_image_folder(src, {"a": 20, "b": 10, "c": 10}, corrupt=False)
    runs = {}
    for name, seed, workers in (("w1", 3, 1), ("w2", 3, 2), ("other_seed", 4, 2)):
        runs[name] = pack(src, str(tmp_path / name), seed=seed, workers=workers, shard_size=6,
                          val_fraction=0.1, test_fraction=0.2, progress="none")
    w1, w2 = runs["w1"], runs["w2"]
    # Fixed tar mtimes: not only the same keys, but byte-identical shards.
    assert [s.sha256 for s in w1.splits.values()] == [s.sha256 for s in w2.splits.values()]
    with tarfile.open(w1.urls("train")[0]) as tar:  # packs within one second would match anyway
        assert {member.mtime for member in tar.getmembers()} == {0}
    assert shard_keys(w1.root) == shard_keys(w2.root)
    order = lambda m: [json.loads(s["json"])["path"] for shard in read_split(m.root, "train")
                       for s in shard]
    assert order(w1) == order(w2) != order(runs["other_seed"])
    # Exact per-class stratification: round(n * fraction) of each class.
    assert w1.splits["val"].class_counts == [2, 1, 1]
    assert w1.splits["test"].class_counts == [4, 2, 2]
    assert w1.splits["train"].class_counts == [14, 7, 7]
    tiny = pack(src, str(tmp_path / "tiny"), max_shard_bytes=1, test_fraction=0, workers=1,
                progress="bar")
    assert "40/40" in capsys.readouterr().out  # rich's bar, rendered once more when it stops
    assert set(tiny.splits["val"].shard_lengths) == {1}  # every sample exceeds 1 byte
    assert tiny.splits["test"].num_samples == 0 and tiny.splits["test"].filenames == []
    assert not any(f.startswith("test-") for f in os.listdir(tiny.root))


def test_csv_explicit_split_wins_and_unknown_labels_are_logged(tmp_path):
    make_image_folder(str(tmp_path / "img"), {"a": 10, "b": 10}, corrupt=False)
    a, b = (sorted(f"img/{c}/{f}" for f in os.listdir(tmp_path / "img" / c)) for c in "ab")
    rows = [("path", "label", "split")]
    rows += [(path, "a", "test") for path in a[:3]]  # forced: wins over --test-fraction 0
    rows += [(a[3], "a", "holdout")]  # not a split name
    rows += [(path, "a", "") for path in a[4:]]
    rows += [(b[0], "b", "val")]  # forced
    rows += [(str(tmp_path / path), "b", "") for path in b[1:]]  # absolute paths
    rows += [(a[0], "zebra", ""), (b[1], "", ""), ("img/missing.jpg", "a", "")]
    with open(tmp_path / "labels.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = str(tmp_path / "out")
    run = cli("pack", str(tmp_path / "labels.csv"), "--out", out, "--val-fraction", "0.2",
              "--test-fraction", "0", "--classes", "b,a", "--workers", "2")
    assert run.returncode == 0, run.stderr
    assert "skipped 4 problematic files" in run.stdout and "packed 20/20 files" in run.stdout
    manifest = load_manifest(out)
    assert manifest.classes == ["b", "a"]  # --classes order is the index order
    paths = lambda split: sorted(json.loads(s["json"])["path"]
                                 for shard in read_split(out, split) for s in shard)
    assert paths("test") == [str(tmp_path / path) for path in a[:3]]
    # val: the forced b + round(0.2 * 9 free b); round(0.2 * 6 free a).
    assert manifest.splits["val"].class_counts == [1 + 2, 1]
    assert str(tmp_path / b[0]) in paths("val")
    assert manifest.splits["train"].class_counts == [7, 5]
    assert all(int(s["cls"]) == ["b", "a"].index(json.loads(s["json"])["label"])
               for shard in read_split(out, "train") for s in shard)
    logged = {(r["path"], r["label"], r["reason"])
              for r in map(json.loads, open(os.path.join(out, PROBLEMS_NAME)))}
    assert logged == {
        (str(tmp_path / a[0]), "zebra", "unknown label 'zebra'"),
        (str(tmp_path / b[1]), "", "empty label"),
        (str(tmp_path / "img/missing.jpg"), "a", "missing file"),
        (str(tmp_path / a[3]), "a", "unknown split 'holdout' (use train/val/test)"),
    }


def test_info_and_verify(packed, tmp_path):
    _, out, _ = packed
    copy = str(tmp_path / "copy")
    shutil.copytree(out, copy)
    info = cli("info", copy)
    assert info.returncode == 0 and "class balance" in info.stdout and "train" in info.stdout
    ok = cli("verify", copy)
    assert ok.returncode == 0 and ok.stdout.startswith("OK:"), ok.stderr
    with open(os.path.join(copy, "train-000001.tar"), "r+b") as f:  # flip one byte
        f.seek(700)
        byte = f.read(1)
        f.seek(700)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.remove(os.path.join(copy, "val-000000.tar"))
    bad = cli("verify", copy)
    assert bad.returncode == 1
    assert "train-000001.tar: sha256 mismatch" in bad.stderr
    assert "val-000000.tar: missing" in bad.stderr
    assert "train-000000.tar" not in bad.stderr


def test_refuses_non_empty_out_then_overwrite_replaces_it(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    refused = cli("pack", src, "--out", str(out), "--workers", "1")
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--overwrite" in refused.stderr
    assert os.listdir(out) == ["keep.txt"]
    done = cli("pack", src, "--out", str(out), "--workers", "1", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert "keep.txt" not in os.listdir(out) and INFO_NAME in os.listdir(out)
    assert os.listdir(tmp_path) == ["out"]  # no temp or old folder left beside it


def exit_status(argv: list[str]) -> int:
    """``main(argv)``'s exit status, whether it returns it or argparse raises SystemExit."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_errors_are_one_line_exit_2(folder, tmp_path, capsys):
    src, _ = folder
    run = cli("pack", str(tmp_path / "nope"))  # one real process: no traceback reaches the user
    assert run.returncode == 2 and "does not exist" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    out = str(tmp_path / "o")
    cases = [
        (["pack", src, "--out", out, "--val-fraction", "1.5"], "val fraction"),
        (["pack", src, "--out", out, "--val-fraction", "0.5", "--test-fraction", "0.5"], "sum"),
        (["pack", src, "--out", out, "--shard-size", "0"], "shard size"),
        (["pack", src, "--out", out, "--resize", "0"], "resize must be at least 1"),
        (["pack", src, "--out", out, "--max-shard-bytes", "lots"], "byte size"),
        (["pack", src, "--out", out, "--classes", "a,zzz"], "zzz"),
        (["pack", src, "--out", out, "--seed", "x"], "invalid int"),
        (["pack", src, "--out", src], "would contain the source"),
        (["pack"], "required"),
        (["info", str(tmp_path)], "no shard manifest"),
        (["verify", str(tmp_path)], "no shard manifest"),
    ]
    for argv, message in cases:
        status = exit_status(argv)
        err = capsys.readouterr().err
        assert status == 2, (argv, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    assert not os.path.exists(out)
