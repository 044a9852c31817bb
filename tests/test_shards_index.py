"""ddp-shards index: manifests for shards other tools wrote (webdataset's ShardWriter and
TarWriter, GNU tar), read by the loader on 2 ranks, by timm's ReaderWds and by verify."""
from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import webdataset as wds
from PIL import Image

from conftest import ROOT, run_torchrun, torchrun_env
from shardgen import png_bytes
from ddp_train.__main__ import main as train_main
from ddp_train.config import DataConfig
from ddp_train.data import build_loader
from ddp_train.dist import DistInfo
from ddp_train.shards.__main__ import main as shards_main
from ddp_train.shards.index import PROGRESS_NAME, settle_classes, IndexingError
from ddp_train.shards.labels import LabelError, LabelReader, LabelSpec, raw_label
from ddp_train.shards.manifest import INFO_NAME, PROBLEMS_NAME, load_manifest
from ddp_train.shards import sources
from ddp_train.shards.sources import expand, parse_split_args
from ddp_train.shards.tar import TarFormatError, tar_samples

NAMES = ("dent", "ok", "scratch")


def read(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def problems_of(root: str) -> list[dict]:
    with open(os.path.join(root, PROBLEMS_NAME), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def index(*args: str) -> int:
    return shards_main(["index", *args, "--workers", "2"])


def write_three_ways(root: str) -> dict[str, list[int]]:
    """train: webdataset.ShardWriter (keys with dots in folder names); val: GNU tar run on a
    folder of KEY.jpg + KEY.cls files (plus a __meta__ member); test: TarWriter with uneven
    shards of 1 to 230 samples. Returns the labels of each split in shard order."""
    labels: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    os.makedirs(root)
    with wds.ShardWriter(os.path.join(root, "train-%06d.tar"), maxcount=7, verbose=0) as w:
        for i in range(40):
            labels["train"].append(i % 3)
            w.write({"__key__": f"line.2/cam.{i % 2}/img{i:04d}", "png": png_bytes(i, 16),
                     "cls": i % 3})
    folder = os.path.join(root, "..", "val-files")
    os.makedirs(folder)
    for i in range(23):
        with open(os.path.join(folder, f"v{i:03d}.jpg"), "wb") as f:
            Image.new("RGB", (20, 16), (i * 10 % 256, 60, 90)).save(f, format="JPEG")
        with open(os.path.join(folder, f"v{i:03d}.cls"), "w") as f:
            f.write(f"{(i * 7) % 3}\n")
        labels["val"].append((i * 7) % 3)
    with open(os.path.join(folder, "__meta__"), "w") as f:
        f.write("written by a shell script\n")
    members = sorted(os.listdir(folder))
    subprocess.run(["tar", "-cf", os.path.join(root, "val-000000.tar"), "-C", folder, *members],
                   check=True)
    start = 100
    for k, n in enumerate((1, 230, 2, 37)):
        with wds.TarWriter(os.path.join(root, f"test-{k:06d}.tar")) as w:
            for i in range(start, start + n):
                labels["test"].append(i % 3)
                w.write({"__key__": f"t{i:05d}", "png": png_bytes(i, 12), "cls": str(i % 3)})
        start += n
    return labels


def timm_info(root: str) -> dict:
    """The _info.json timm's tooling writes: splits with filenames and lengths, no classes."""
    splits = {}
    for split in ("train", "val", "test"):
        names = sorted(n for n in os.listdir(root) if n.startswith(split + "-"))
        lengths = []
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                lengths.append(sum(1 for _ in tar_samples(f)))
        splits[split] = {"name": split, "num_samples": sum(lengths), "filenames": names,
                         "shard_lengths": lengths}
    return {"name": "conveyor", "description": "timm-style shards", "splits": splits}


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    base = tmp_path_factory.mktemp("three")
    root = str(base / "plain")
    labels = write_three_ways(root)
    with_timm = str(base / "with_timm")
    shutil.copytree(root, with_timm)
    doc = timm_info(with_timm)
    with open(os.path.join(with_timm, INFO_NAME), "w") as f:
        json.dump(doc, f)
    assert index(root) == 0 and index(with_timm) == 0
    return root, with_timm, labels, doc


def test_index_matches_what_was_written(three_ways):
    root, with_timm, labels, timm_doc = three_ways
    manifest = load_manifest(root)
    assert manifest.classes == ["0", "1", "2"] and manifest.label["kind"] == "index"
    for split, want in labels.items():
        info = manifest.splits[split]
        assert info.num_samples == len(want)
        assert info.class_counts == [want.count(c) for c in range(3)]
        assert [sum(c) for c in info.shard_class_counts] == info.shard_lengths
    assert manifest.splits["train"].shard_lengths == [7, 7, 7, 7, 7, 5]
    assert manifest.splits["test"].shard_lengths == [1, 230, 2, 37]
    assert shards_main(["verify", root]) == 0
    # A timm _info.json is completed: its own keys stay, the counts agree with timm's.
    doc = read(os.path.join(with_timm, INFO_NAME))
    assert doc["name"] == "conveyor" and doc["description"] == "timm-style shards"
    assert doc["classes"] == ["0", "1", "2"] and doc["index"]["shard_sets"] == \
        "the existing _info.json"
    for split, s in timm_doc["splits"].items():
        assert doc["splits"][split]["shard_lengths"] == s["shard_lengths"]
        assert doc["splits"][split]["sha256"] == manifest.splits[split].sha256


def test_timm_reader_reads_the_indexed_sets(three_ways):
    from timm.data.readers.reader_wds import ReaderWds

    root, with_timm, labels, _ = three_ways
    for where in (root, with_timm):
        for split in ("train", "test"):
            reader = ReaderWds(root=where, split=split, is_training=False)
            got = collections.Counter(t for _, t in reader)
            assert got == collections.Counter(labels[split])


def test_two_ranks_two_workers_train_and_eval_exactly(three_ways, tmp_path):
    root, _, labels, _ = three_ways
    run = tmp_path / "run"
    run_torchrun("ddp_train", f"data.shards={root}", f"run.path={run}", "data.image_size=32",
                 "data.num_workers=2", "train.batch_size=4", "train.max_steps=6",
                 "eval.every_steps=3", "eval.every_epoch=false", "log.progress=none",
                 extra=("-m",))
    with open(run / "eval.jsonl") as f:
        evals = [json.loads(line) for line in f]
    val = [e for e in evals if e["split"] == "val"]
    test = [e for e in evals if e["split"] == "test"]
    assert val and len(test) == 1
    for records, split in ((val, "val"), (test, "test")):
        for e in records:  # every sample of the split once, over 2 ranks x 2 workers
            assert e["count"] == len(labels[split])
            assert [c["support"] for c in e["per_class"]] == \
                [labels[split].count(c) for c in range(3)]


def test_json_labels_truncated_shards_and_samples_without_image(tmp_path, capsys):
    root = str(tmp_path / "ds")
    os.makedirs(root)
    want = []
    with wds.TarWriter(os.path.join(root, "train-000000.tar")) as w:
        for i in range(30):
            name = NAMES[i % 3]
            want.append(name)
            w.write({"__key__": f"k{i:03d}", "jpg": jpeg(i),
                     "json": json.dumps({"label": name, "id": i}).encode()})
        w.write({"__key__": "no_image", "json": json.dumps({"label": "ok"}).encode()})
        w.write({"__key__": "no_label", "jpg": jpeg(99), "json": b'{"id": 99}'})
    good = open(os.path.join(root, "train-000000.tar"), "rb").read()
    with open(os.path.join(root, "train-000001.tar"), "wb") as f:
        f.write(good[:5000])  # cut inside a member
    with tarfile.open(os.path.join(root, "train-000000.tar")) as t:
        boundary = t.getmembers()[4].offset  # where the third sample's first header starts
    with open(os.path.join(root, "train-000002.tar"), "wb") as f:
        f.write(good[:boundary])  # cut at a member boundary: no end-of-archive block
    shutil.copy(os.path.join(root, "train-000000.tar"), os.path.join(root, "val-000000.tar"))

    assert index(root, "--label-key", "json:label") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 of 4 shards cannot be read" in err[0] and "--skip-bad" in err[0]
    assert not os.path.exists(os.path.join(root, INFO_NAME))
    bad = {p["shard"] for p in problems_of(root) if p["key"] is None}
    assert bad == {"train-000001.tar", "train-000002.tar"}

    assert index(root, "--label-key", "json:label", "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "left out 2 unreadable shards" in out and "2 of 4 shards already indexed" in out
    manifest = load_manifest(root)
    assert manifest.classes == sorted(NAMES) and manifest.label == {
        "member": "json", "field": "label", "kind": "name"}
    assert manifest.splits["train"].filenames == ["train-000000.tar"]
    assert manifest.splits["train"].shard_lengths == [30]
    problems = problems_of(root)
    assert manifest.problematic == len(problems) == 2 + 2 * 2  # 2 shards; 2 samples, 2 copies
    by_key = {(p["shard"], p["key"]): p["problem"] for p in problems}
    assert by_key[("train-000000.tar", "no_image")].startswith("no image (members: json)")
    assert "no field 'label'" in by_key[("val-000000.tar", "no_label")]
    assert "truncated" in by_key[("train-000002.tar", None)]
    assert shards_main(["info", root]) == 0
    assert "6 problems left out (of them 2 unreadable shards)" in " ".join(
        capsys.readouterr().out.split())
    # The loader skips the same two samples: positions are what the index counted.
    labels = eval_labels(root, "val", workers=2)
    assert labels == [sorted(NAMES).index(n) for n in want]
    # --classes sets the order (and names every class the labels may use)
    assert index(root, "--label-key", "json:label", "--skip-bad", "--classes",
                 "ok,scratch,dent") == 0
    assert eval_labels(root, "val", workers=0) == [["ok", "scratch", "dent"].index(n)
                                                  for n in want]
    assert shards_main(["verify", root]) == 0


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), (i * 20 % 256, 100, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def eval_labels(shards: str, split: str, workers: int) -> list[int]:
    cfg = DataConfig(shards=shards, image_size=8, num_workers=workers)
    loader = build_loader(cfg, DistInfo(), split=split, train=False, batch_size=4, seed=0)
    # one worker: its batches come in position order; two: round robin, so sort by role
    return [y for _, labels in loader for y in labels.tolist()] if workers < 2 else \
        sorted_by_role(loader)


def sorted_by_role(loader) -> list[int]:
    batches = [labels.tolist() for _, labels in loader]
    roles = [batches[0::2], batches[1::2]]
    return [y for role in roles for b in role for y in b]


def test_pipe_root_indexed_to_a_separate_folder(tmp_path, capsys):
    shards, out = str(tmp_path / "readonly"), str(tmp_path / "index")
    os.makedirs(shards)
    for k, n in enumerate((3, 9)):
        with wds.TarWriter(os.path.join(shards, f"part-{k}.tar")) as w:
            for i in range(n):
                w.write({"__key__": f"{k}_{i}", "webp": webp(i), "txt": NAMES[i % 3].encode()})
    root = f"pipe:cat {shards}/{{}}"
    assert index(root, "--label-key", "txt") == 2  # a remote root needs --out
    assert "--out DIR" in capsys.readouterr().err
    assert index(root, "--out", out, "--label-key", "txt", "--split",
                 "train=part-{0..1}.tar") == 0
    assert not os.path.exists(os.path.join(shards, INFO_NAME))
    manifest = load_manifest(out)
    assert manifest.root == root and manifest.splits["train"].num_samples == 12
    assert eval_labels(out, "train", workers=0) == [sorted(NAMES).index(NAMES[i % 3])
                                                    for n in (3, 9) for i in range(n)]
    assert shards_main(["verify", out]) == 0
    # the same shards over HTTP (webdataset opens URLs with curl)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(
        QuietHandler, directory=shards))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url, by_url = f"http://127.0.0.1:{server.server_port}/", str(tmp_path / "by_url")
        assert index(url, "--out", by_url, "--label-key", "txt", "--split",
                     "train=part-{0..1}.tar") == 0
        assert load_manifest(by_url).splits == manifest.splits
        assert eval_labels(by_url, "train", workers=2) == sorted_labels(out)
        assert shards_main(["verify", by_url]) == 0
    finally:
        server.shutdown()
    with open(os.path.join(shards, "part-1.tar"), "r+b") as f:
        f.seek(700)
        f.write(b"X")
    assert shards_main(["verify", out]) == 1
    assert "part-1.tar: sha256 mismatch" in capsys.readouterr().err


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # no request lines on the test's stderr
        pass


def sorted_labels(shards: str) -> list[int]:
    return sorted_by_role(build_loader(DataConfig(shards=shards, image_size=8, num_workers=2),
                                       DistInfo(), split="train", train=False, batch_size=4,
                                       seed=0))


def webp(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (9, 9), (i * 30 % 256, 5, 5)).save(buf, format="WEBP")
    return buf.getvalue()


def test_interrupted_index_rereads_only_the_shards_not_yet_indexed(tmp_path):
    shards, out, log = tmp_path / "shards", tmp_path / "index", tmp_path / "opened.log"
    os.makedirs(shards)
    for k in range(8):
        with wds.TarWriter(str(shards / f"train-{k:02d}.tar")) as w:
            w.write({"__key__": f"s{k}", "png": png_bytes(k), "cls": k % 2})
    # every open is logged, and slow, so the index can be stopped half-way
    root = f"pipe:sh -c 'echo {{}} >> {log}; sleep 0.4; cat {shards}/{{}}'"
    cmd = [sys.executable, "-m", "ddp_train.shards", "index", root, "--out", str(out),
           "--split", "train=train-{00..07}.tar", "--workers", "1"]
    proc = subprocess.Popen(cmd, env=torchrun_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    progress = out / PROGRESS_NAME
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if progress.exists() and len(progress.read_text().splitlines()) >= 4:  # header + 3
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert not (out / INFO_NAME).exists()
    indexed = {json.loads(line)["name"] for line in progress.read_text().splitlines()[1:]}
    assert 3 <= len(indexed) < 8
    log.unlink()
    done = subprocess.run(cmd, env=torchrun_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    # shards re-read (the other line is the look for a timm _info.json beside them)
    reread = [name for name in log.read_text().split() if name.endswith(".tar")]
    assert sorted(reread) == sorted({f"train-{k:02d}.tar" for k in range(8)} - indexed)
    assert load_manifest(str(out)).splits["train"].num_samples == 8


def test_loader_errors_name_the_index_command(tmp_path, capsys, monkeypatch):
    timm_only = tmp_path / "timm_only"
    os.makedirs(timm_only)
    with wds.TarWriter(str(timm_only / "train-000000.tar")) as w:
        w.write({"__key__": "a", "png": png_bytes(1), "cls": 0})
    with open(timm_only / INFO_NAME, "w") as f:
        json.dump({"splits": {"train": {"name": "train", "num_samples": 1,
                                        "filenames": ["train-000000.tar"],
                                        "shard_lengths": [1]}}}, f)
    status = train_main([f"data.shards={timm_only}", f"run.path={tmp_path / 'r'}",
                         "log.progress=none"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].endswith(f"without class names: complete it with `ddp-shards index "
                           f"{timm_only}`"), err
    bare = tmp_path / "bare"
    os.makedirs(bare)
    with wds.TarWriter(str(bare / "shard_a.tar")) as w:
        w.write({"__key__": "a", "png": png_bytes(1), "json": b'{"category": "ok"}'})
    with pytest.raises(FileNotFoundError) as e:
        load_manifest(str(bare))
    assert str(e.value).endswith(f"index them with `ddp-shards index {bare} --split "
                                 "train='*.tar' --label-key json:category`")
    # a folder this user cannot write to (CI runs as root, for whom chmod changes nothing)
    monkeypatch.setattr(sources.os, "access", lambda path, mode: False)
    with pytest.raises(FileNotFoundError, match=r"ddp-shards index \S+ --out WRITABLE_DIR "):
        load_manifest(str(bare))


# ------------------------------------------------------------------------------ the parts

def test_label_values():
    def raw(**members):
        return {k: v.encode() if isinstance(v, str) else v for k, v in members.items()}

    assert raw_label(raw(cls="3\n"), LabelSpec()) == 3
    assert raw_label(raw(cls=" scratch "), LabelSpec()) == "scratch"
    assert raw_label(raw(txt="0042"), LabelSpec("txt")) == "0042"  # names keep their zeros
    assert raw_label(raw(json='{"a": {"b": 2}}'), LabelSpec.parse("json:a.b")) == 2
    assert raw_label(raw(json='{"label": "7"}'), LabelSpec.parse("json:label")) == "7"
    for bad, spec in ((raw(json='{"label": true}'), "json:label"), (raw(json="[1]"), "json:x"),
                      (raw(cls="-1"), "cls"), (raw(txt="  "), "txt"), (raw(jpg=b""), "cls"),
                      (raw(json="{nope"), "json:label")):
        with pytest.raises(LabelError):
            raw_label(bad, LabelSpec.parse(spec))
    for text in ("", "json:", ":label"):
        with pytest.raises(ValueError, match="--label-key"):
            LabelSpec.parse(text)
    reader = LabelReader({"member": "txt", "kind": "name"}, ["a", "b"])
    samples = [raw(jpg="x", txt="b"), raw(txt="a"), raw(jpg="x", txt="c"), raw(png="x", txt="a")]
    assert [s["__label__"] for s in reader.usable(samples)] == [1, 0]
    assert [s["__label__"] for s in LabelReader({}, ["0", "1"]).usable(
        [raw(png="x", cls="1"), raw(png="x", cls="2")])] == [1]


def test_classes_settle():
    assert settle_classes({2, 0}, ()) == (["0", "1", "2"], "index")
    assert settle_classes({"dog", "cat"}, ()) == (["cat", "dog"], "name")
    assert settle_classes({"dog"}, ("dog", "cat")) == (["dog", "cat"], "name")
    with pytest.raises(IndexingError, match="mix class numbers"):
        settle_classes({1, "cat"}, ())


def test_patterns(tmp_path):
    for name in ("train-0.tar", "train-1.tar", "train-10.tar", "val-0.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    root = str(tmp_path)
    assert expand(root, "train-*.tar") == ["train-0.tar", "train-1.tar", "train-10.tar"]
    assert expand(root, "train-{0..1}.tar") == ["train-0.tar", "train-1.tar"]
    assert expand("pipe:cat /x/{}", "a-{000..002}.tar") == ["a-000.tar", "a-001.tar",
                                                            "a-002.tar"]
    assert expand(root, "{val,train}-0.tar") == ["val-0.tar", "train-0.tar"]
    with pytest.raises(ValueError, match="cannot be listed"):
        expand("https://host/ds", "train-*.tar")
    with pytest.raises(ValueError, match="matches no file"):
        expand(root, "test-*.tar")
    assert parse_split_args(["train=a*.tar", "val = b.tar"]) == {"train": "a*.tar",
                                                                 "val": "b.tar"}
    for bad in (["train"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(ValueError, match="--split"):
            parse_split_args(bad)


def test_strict_tar_reading_finds_a_cut_at_a_member_boundary():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name in ("a.png", "a.cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            t.addfile(info, io.BytesIO(b"abc"))
    whole = buf.getvalue()
    cut = whole[:2 * 1024]  # both members' headers and data, no end-of-archive block
    assert len(list(tar_samples(io.BytesIO(cut)))) == 1  # the loader stays lenient
    with pytest.raises(TarFormatError, match="truncated"):
        list(tar_samples(io.BytesIO(cut), strict=True))
    with pytest.raises(TarFormatError, match="empty file"):
        list(tar_samples(io.BytesIO(b""), strict=True))
    assert len(list(tar_samples(io.BytesIO(whole), strict=True))) == 1


def test_index_of_packed_shards_equals_the_pack_manifest(tmp_path):
    """The index's counts and hashes of shards `pack` wrote are those pack recorded."""
    from helpers_images import make_image_folder
    from ddp_train.shards.pack import pack

    src = str(tmp_path / "src")
    make_image_folder(src, {"a": 9, "b": 6, "c": 5}, corrupt=False)
    packed = pack(src, str(tmp_path / "packed"), shard_size=4, workers=1, progress="none")
    bare = tmp_path / "bare"
    shutil.copytree(packed.root, bare, ignore=shutil.ignore_patterns(INFO_NAME, PROBLEMS_NAME))
    assert index(str(bare), "--classes", ",".join(packed.classes)) == 0
    indexed = load_manifest(str(bare))
    assert indexed.classes == packed.classes and indexed.label["kind"] == "index"
    for name, split in packed.splits.items():
        got = indexed.splits[name]
        assert (got.filenames, got.shard_lengths, got.sha256, got.class_counts) == (
            split.filenames, split.shard_lengths, split.sha256, split.class_counts)
    # a local root indexed elsewhere: the manifest points back at it, relative to itself
    elsewhere = tmp_path / "indexes" / "parts"
    assert index(str(bare), "--out", str(elsewhere)) == 0
    assert read(os.path.join(elsewhere, INFO_NAME))["shard_root"] == "../../bare"
    assert load_manifest(str(elsewhere)).root == str(bare)
    assert shards_main(["verify", str(elsewhere)]) == 0
    total = sum(s.num_samples for s in packed.splits.values())
    assert sum(len(eval_labels(str(elsewhere), name, workers=0)) for name in packed.splits) == total


def test_class_balance_reads_labels_through_the_manifest(tmp_path):
    """data.class_balance resamples by the labels the index found (here in json, no cls)."""
    root = str(tmp_path / "ds")
    os.makedirs(root)
    with wds.TarWriter(os.path.join(root, "train-0.tar")) as w:
        for i in range(24):
            name = "dent" if i % 6 == 0 else "ok"  # 4 dents, 20 ok
            w.write({"__key__": f"k{i}", "jpg": jpeg(i), "json": json.dumps({"y": name}).encode()})
    assert index(root, "--label-key", "json:y") == 0
    cfg = DataConfig(shards=root, image_size=8, num_workers=0, shuffle_buffer=24,
                     class_balance=1.0)
    loader = build_loader(cfg, DistInfo(), split="train", train=True, batch_size=4, seed=0)
    drawn = [y for _ in range(5) for _, labels in loader for y in labels.tolist()]
    assert len(drawn) == 5 * 24
    assert drawn.count(0) / len(drawn) > 0.35  # "dent" is class 0; unbalanced it is 1/6


def test_cls_holding_names(tmp_path):
    """cls members holding class names (not numbers): names sorted, looked up by the loader."""
    root = str(tmp_path / "ds")
    os.makedirs(root)
    order = ["scratch", "ok", "dent", "ok", "scratch", "ok"]
    with wds.TarWriter(os.path.join(root, "val-000000.tar")) as w:
        for i, name in enumerate(order):
            w.write({"__key__": f"k{i}", "png": png_bytes(i), "cls": name})
    assert index(root) == 0
    manifest = load_manifest(root)
    assert manifest.classes == ["dent", "ok", "scratch"] and manifest.label["kind"] == "name"
    assert manifest.splits["val"].class_counts == [1, 3, 2]
    assert eval_labels(root, "val", workers=0) == [manifest.classes.index(n) for n in order]


def test_gzipped_shards_are_named_and_read_through_a_pipe(tmp_path, capsys):
    root = tmp_path / "gz"
    os.makedirs(root)
    with wds.TarWriter(str(root / "train-0.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "png": png_bytes(i), "cls": i % 2})
    subprocess.run(["gzip", str(root / "train-0.tar")], check=True)
    assert index(str(root), "--split", "train=*.tar.gz") == 1
    assert "gzip-compressed tar" in capsys.readouterr().err
    assert index(f"pipe:gzip -dc {root}/{{}}", "--out", str(tmp_path / "idx"), "--split",
                 "train=train-0.tar.gz") == 0
    assert eval_labels(str(tmp_path / "idx"), "train", workers=0) == [0, 1, 0, 1, 0]
