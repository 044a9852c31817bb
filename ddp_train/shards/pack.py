"""Pack an image folder or a CSV of ``path,label[,split]`` into WebDataset shards plus a manifest.

The flow is linear: scan the source into :class:`Item` s, drop items with an unknown label,
split each class with a seeded generator, shuffle each split, decode every image once in a
process pool, and write the decodable ones with ``webdataset.ShardWriter`` into a temporary
folder that is moved into place only when the manifest is written. The layout is described in
``shards/README.md``.
"""
from __future__ import annotations

import csv
import datetime
import functools
import io
import json
import multiprocessing
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from .. import __version__
from . import extras as extra_members
from . import folds
from .errors import PackError  # defined apart so that folds.py raises it too; import it from here
from .manifest import PROBLEMS_NAME, Manifest, SplitInfo, write_manifest
from .progress import PROGRESS_MODES, FileProgress
from .report import sha256_file

SPLITS = ("train", "val", "test")
# PIL format -> sample key. These are the formats timm's ReaderWds looks for ("jpg;png;webp").
# MPO is what PIL calls the multi-picture JPEGs phones write: the bytes are a valid JPEG.
STORED = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
SAVE_ARGS = {"jpg": dict(format="JPEG", quality=95), "png": dict(format="PNG"),
             "webp": dict(format="WEBP", quality=95)}
PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
# Fixed tar member mtime: TarWriter stamps time.time() by default, which would make two packs
# with the same seed differ. With it, same source + seed -> byte-identical shards and sha256.
SHARD_MTIME = 0


@dataclass(frozen=True)
class PackSettings:
    """How to pack, validated when built: a bad setting raises :class:`PackError` before any
    source file is scanned or decoded."""

    val_fraction: float | None = None  # per class, of the free items; None: 0.1, 0 with folds
    test_fraction: float = 0.1
    seed: int = 0  # split draw and split shuffles
    shard_size: int = 1000  # samples per shard at most
    max_shard_bytes: int = 256 * 2**20  # a new shard starts past this size
    resize: int | None = None  # shrink images whose longer side exceeds it; None: keep
    workers: int | None = None  # decoding processes; None or 0: every CPU
    overwrite: bool = False  # replace a non-empty output folder
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise), bar, lines or none
    folds: int = 0  # K cross-validation folds of train (0 = none; a CSV fold column implies K)
    fold_seed: int | None = None  # StratifiedKFold's random_state; None: seed

    def __post_init__(self) -> None:
        # Resolved here (frozen: via object.__setattr__) so the manifest records the count used.
        object.__setattr__(self, "workers", self.workers or os.cpu_count() or 1)
        object.__setattr__(self, "fold_seed", self.seed if self.fold_seed is None
                           else self.fold_seed)
        if self.progress not in PROGRESS_MODES:
            raise PackError(f"progress must be one of {', '.join(PROGRESS_MODES)}, "
                            f"not {self.progress!r}")
        folds.check_settings(self.folds, self.val_fraction)
        # None stays None until packing: a CSV fold column may still turn folds on (folds.settle)
        val = 0.1 if self.val_fraction is None else self.val_fraction
        for name, value in (("val fraction", val), ("test fraction", self.test_fraction)):
            if not 0 <= value < 1:
                raise PackError(f"{name} must be in [0, 1), got {value}")
        if val + self.test_fraction >= 1:
            raise PackError(f"val + test fractions must sum to less than 1 (leaving a train "
                            f"split), got {val} + {self.test_fraction}")
        for name, value in (("shard size", self.shard_size),
                            ("max shard bytes", self.max_shard_bytes), ("workers", self.workers),
                            # None = keep sizes; 0 would shrink every image to nothing
                            ("resize", 1 if self.resize is None else self.resize)):
            if value < 1:
                raise PackError(f"{name} must be at least 1, got {value}")

    def record(self, source: str) -> dict[str, Any]:
        """The manifest's ``pack`` entry: the settings that shape the shards (not overwrite or
        progress), the source, and when and by which version it was packed."""
        created = datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds")
        return dict(source=source, seed=self.seed, val_fraction=self.val_fraction,
                    test_fraction=self.test_fraction, shard_size=self.shard_size,
                    max_shard_bytes=self.max_shard_bytes, resize=self.resize,
                    workers=self.workers, created=created, ddp_train_version=__version__,
                    **(dict(folds=self.folds, fold_seed=self.fold_seed) if self.folds else {}))


@dataclass(frozen=True)
class Item:
    """One source file: where to read it, its class name, and an optional forced split."""

    path: str
    label: str
    split: str | None = None  # "train"/"val"/"test" wins over the seeded split; None: assign one
    extras: tuple[tuple[str, str], ...] = ()  # (column, cell) pairs stored next to the image
    fold: int | None = None  # CSV fold column: wins over the StratifiedKFold draw (folds.py)


def scan_folder(src: str) -> tuple[list[Item], list[str]]:
    """Items of an ImageFolder tree (class = top-level sub-folder, classes sorted by name).

    Files are taken by extension (any format PIL can open), recursively, hidden names skipped,
    in sorted order so the seeded split is reproducible.
    """
    classes = sorted(e.name for e in os.scandir(src) if e.is_dir() and not e.name.startswith("."))
    exts = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    items = []
    for label in classes:
        for folder, subdirs, files in os.walk(os.path.join(src, label), followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            items += [Item(os.path.abspath(os.path.join(folder, f)), label) for f in sorted(files)
                      if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts]
    return items, classes


def scan_csv(src: str, extras: Sequence[str] = ()) -> tuple[list[Item], list[str]]:
    """Items of a CSV with a header naming ``path,label``, optionally ``split`` and ``extras``.

    Relative paths are relative to the CSV's folder. Classes are the sorted non-empty labels.
    Each ``extras`` column is stored as a member next to the image (:mod:`.extras`).
    """
    base = os.path.dirname(os.path.abspath(src))
    with open(src, newline="", encoding="utf-8-sig") as f:  # -sig: tolerate Excel's BOM
        rows = csv.DictReader(f)
        if not {"path", "label", *extras} <= set(rows.fieldnames or []):
            raise PackError(f"{src}: the header must name the columns path,label[,split]"
                            f"{''.join(',' + e for e in extras)} "
                            f"(found {','.join(rows.fieldnames or []) or 'nothing'})")
        items = [Item(os.path.join(base, (row["path"] or "").strip()), (row["label"] or "").strip(),
                      (row.get("split") or "").strip() or None,
                      tuple((e, extra_members.resolve(row[e], base)) for e in extras),
                      folds.parse_cell(row.get("fold"), row["path"]))
                 for row in rows]
    return items, sorted({item.label for item in items if item.label})


def assign_splits(items: Sequence[Item], classes: Sequence[str], val_fraction: float,
                  test_fraction: float, seed: int) -> dict[str, list[Item]]:
    """Split items per class (stratified) with a seeded generator; an explicit ``Item.split`` wins.

    Every item's label must be in ``classes``. Each class gets ``round(n * fraction)`` val and
    test items out of its n items without an explicit split. Every split is then shuffled,
    seeded, so that a shard mixes the classes.
    """
    splits: dict[str, list[Item]] = {name: [] for name in SPLITS}
    free: dict[str, list[Item]] = {label: [] for label in classes}
    for item in items:
        (splits[item.split] if item.split else free[item.label]).append(item)
    for label, group in free.items():
        # One generator per class: a class's split does not change when other classes change.
        random.Random(f"{seed}/{label}").shuffle(group)
        n_val = int(len(group) * val_fraction + 0.5)
        n_test = min(int(len(group) * test_fraction + 0.5), len(group) - n_val)
        splits["val"] += group[:n_val]
        splits["test"] += group[n_val:n_val + n_test]
        splits["train"] += group[n_val + n_test:]
    for name, group in splits.items():
        random.Random(f"{seed}/{name}").shuffle(group)
    return splits


def load_image(job: tuple[str, int | None]) -> tuple[bytes, str, list[int]] | str:
    """Read and fully decode one file (runs in a pool worker).

    Returns ``(bytes to store, sample key jpg/png/webp, original [w, h])``, or the reason the
    file is unusable as a string.
    """
    path, max_side = job
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return "missing file"
    except OSError as e:
        return f"unreadable: {e.strerror or e}"
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode every pixel: a truncated JPEG fails here (no LOAD_TRUNCATED_IMAGES)
            return _encode(img, data, max_side)
    except UnidentifiedImageError:
        return "not an image"
    except Exception as e:  # PIL plugins raise many types on bad data (OSError, SyntaxError, ...)
        return f"corrupt image: {type(e).__name__}: {e}"


def _encode(img: Image.Image, data: bytes, max_side: int | None) -> tuple[bytes, str, list[int]]:
    """The bytes to store for a decoded image: the original file unless it must be re-encoded."""
    size = list(img.size)
    ext = STORED.get(img.format or "")
    shrink = max_side is not None and max(img.size) > max_side
    if ext and not shrink:
        return data, ext, size  # keep the original bytes: no quality loss and no encoding work
    if shrink:
        img.thumbnail((max_side, max_side))  # keeps the aspect ratio
    if ext is None:
        # BMP/TIFF/GIF/...: timm's reader only looks for jpg/png/webp, and PNG is lossless.
        ext = "png"
        if img.mode not in PNG_MODES:
            img = img.convert("RGBA" if "A" in img.mode else "RGB")
    buf = io.BytesIO()
    img.save(buf, **SAVE_ARGS[ext])
    return buf.getvalue(), ext, size


def load_sample(job: tuple[str, int | None, tuple[tuple[str, str], ...]]) -> tuple | str:
    """:func:`load_image` plus the sample's extra members (pool worker): ``(bytes, key, size,
    {column: (member, bytes, spec)})``, or the reason the sample is unusable."""
    path, max_side, extras = job
    image = load_image((path, max_side))
    if isinstance(image, str):
        return image
    try:
        return (*image, {name: extra_members.encode(name, value) for name, value in extras})
    except ValueError as e:
        return str(e)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise PackError(f"output {out} exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise PackError(f"output folder {out} is not empty (use --overwrite to replace it)")


def _problem(item: Item, reason: str) -> dict[str, str]:
    return {"path": item.path, "label": item.label, "reason": reason}


def _triage(items: Sequence[Item], classes: Sequence[str]) -> tuple[list[Item], list[dict]]:
    """Items whose label and split are valid, and a problem record for each of the others."""
    known = set(classes)
    usable, problems = [], []
    for item in items:
        if not item.label:
            problems.append(_problem(item, "empty label"))
        elif item.label not in known:
            problems.append(_problem(item, f"unknown label {item.label!r}"))
        elif item.split and item.split not in SPLITS:
            problems.append(_problem(item, f"unknown split {item.split!r} (use train/val/test)"))
        else:
            usable.append(item)
    return usable, problems


def _write_split(name: str, items: list[Item], classes: Sequence[str], folder: str,
                 decoded: Any, new_writer: Callable, bar: FileProgress,
                 problems: list[dict], specs: dict[str, dict]) -> SplitInfo:
    """Write one split's decodable items as ``folder/{name}-NNNNNN.tar``; log the others.

    ``specs`` holds each extra column's shape/keys as first seen (in any split); a sample whose
    extras differ is a problem, since the loader must batch them."""
    index = {label: i for i, label in enumerate(classes)}
    counts = [0] * len(classes)
    shards: list[tuple[str, int, str]] = []  # (file name, samples, sha256) per closed shard
    writer, written = None, 0

    def record(fname: str) -> None:  # ShardWriter's post= hook: runs right after a shard closes
        shards.append((os.path.basename(fname), writer.count, sha256_file(fname)))

    for item, result in zip(items, decoded):
        bar.advance()
        if isinstance(result, str):
            problems.append(_problem(item, result))
            continue
        data, ext, size, extras = result
        for column, (_, _, spec) in extras.items():
            specs.setdefault(column, spec)
        reason = "; ".join(filter(None, (extra_members.mismatch(spec, specs[column])
                                         for column, (_, _, spec) in extras.items())))
        if reason:
            problems.append(_problem(item, reason))
            continue
        if writer is None:  # ShardWriter opens a shard when created: an empty split gets none
            writer = new_writer(os.path.join(folder, f"{name}-%06d.tar"), post=record)
        writer.write({"__key__": f"{name}_{written:08d}", ext: data, "cls": index[item.label],
                      "json": {"path": item.path, "size": size, "label": item.label},
                      **{member: blob for member, blob, _ in extras.values()}})
        counts[index[item.label]] += 1
        written += 1
    if writer is not None:
        writer.close()
    return SplitInfo(name=name, num_samples=written, filenames=[s[0] for s in shards],
                     shard_lengths=[s[1] for s in shards], sha256=[s[2] for s in shards],
                     class_counts=counts)


def _move_into_place(tmp: str, out: str) -> None:
    """Swap the finished temp folder in; an old ``out`` is removed only after the swap."""
    old = tmp + ".old"
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _write_splits(splits: dict[str, list[Item]], classes: Sequence[str], folder: str,
                  settings: PackSettings, problems: list[dict],
                  specs: dict[str, dict]) -> dict[str, SplitInfo]:
    """Decode every item in a process pool and write each split's shards into ``folder``."""
    import webdataset as wds  # imports torch (seconds): only once the input passed its checks

    new_writer = functools.partial(wds.ShardWriter, maxcount=settings.shard_size,
                                   maxsize=settings.max_shard_bytes, verbose=0, mtime=SHARD_MTIME)
    infos, workers = {}, settings.workers
    total = sum(len(group) for group in splits.values())
    chunk = max(1, min(64, total // (8 * workers)))  # few round trips, yet balanced over workers
    with multiprocessing.Pool(workers) as pool, FileProgress(total, settings.progress) as bar:
        for name, group in splits.items():
            # Ordered imap: results come back in input order whatever the worker count,
            # so the shards are the same for 1 or 64 workers.
            jobs = [(item.path, settings.resize, item.extras) for item in group]
            decoded = pool.imap(load_sample, jobs, chunk)
            infos[name] = _write_split(name, group, classes, folder, decoded, new_writer, bar,
                                       problems, specs)
    return infos


def _write_problems(folder: str, problems: list[dict]) -> None:
    """``problematic_files.jsonl``: one {path, label, reason} object per line, sorted by path."""
    with open(os.path.join(folder, PROBLEMS_NAME), "w", encoding="utf-8") as f:
        for problem in sorted(problems, key=lambda p: p["path"]):
            f.write(json.dumps(problem) + "\n")


def pack_items(items: Sequence[Item], classes: Sequence[str], out: str,
               settings: PackSettings | None = None, *, source: str = "") -> Manifest:
    """Pack ``items`` (class index = position in ``classes``) into shards under ``out``.

    Writes ``{train,val,test}-NNNNNN.tar`` (with folds: ``train-f{k}-NNNNNN.tar``),
    ``_info.json`` and ``problematic_files.jsonl``, as ``settings`` say (default:
    ``PackSettings()``); ``source`` is recorded in the manifest.
    Raises PackError for a non-empty ``out`` without ``settings.overwrite``, a class without
    files, or when no image at all could be decoded (bad settings fail in PackSettings).
    """
    settings = settings or PackSettings()
    _check_out(out, settings.overwrite)
    usable, problems = _triage(items, classes)
    empty = sorted(set(classes) - {item.label for item in usable})
    if empty:  # a typo in --classes or an empty class folder: fail now, not at training time
        raise PackError(f"no files for class(es) {', '.join(empty)}")
    usable, settings = folds.settle(usable, settings)  # K and the val fraction, CSV folds checked
    splits = assign_splits(usable, classes, settings.val_fraction, settings.test_fraction,
                           settings.seed)
    splits = folds.split_train(splits, classes, settings)  # train -> one entry per fold
    record = settings.record(source)
    # Build in a hidden sibling folder: a crash leaves ".NAME.partial-PID", never a half dataset
    # at ``out``, and the rename at the end is atomic on one filesystem. (Not tempfile.mkdtemp:
    # its 0700 mode would end up on the dataset folder.)
    parent, name = os.path.split(os.path.abspath(out))
    tmp = os.path.join(parent, f".{name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a crashed run that had our pid
    os.makedirs(tmp)
    try:
        specs: dict[str, dict] = {}  # extra column -> member, shape/keys (manifest "extras")
        infos = _write_splits(splits, classes, tmp, settings, problems, specs)
        infos, fold_record = folds.join_train(infos, settings, usable)
        if not any(info.num_samples for info in infos.values()):
            raise PackError(f"none of {len(items)} files could be used, e.g. "
                            f"{problems[0]['path']}: {problems[0]['reason']}")
        _write_problems(tmp, problems)
        manifest = Manifest(root=out, classes=list(classes), splits=infos, pack=record,
                            problematic=len(problems), extras=specs, folds=fold_record)
        write_manifest(manifest, tmp)
        _move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a no-op after a successful move
    return manifest


def pack(src: str, out: str | None = None, *, classes: Sequence[str] | None = None,
         extras: Sequence[str] = (), settings: PackSettings | None = None,
         **options: Any) -> Manifest:
    """Pack an image folder or a ``path,label[,split]`` CSV as ``settings`` say, or as
    ``PackSettings(**options)`` when given its fields as keywords (``pack(src, workers=2)``).

    ``out`` defaults to ``shards/<name of SRC>``; ``classes`` restricts and orders the classes
    (files of other classes are logged as unknown labels); ``extras`` names CSV columns stored
    as extra members next to each image (:mod:`.extras`).
    """
    if settings is None:
        settings = PackSettings(**options)
    elif options:  # two sources of truth for one setting: refuse rather than pick one
        raise TypeError(f"pack() got settings and the keywords {', '.join(options)}")
    if not os.path.exists(src):
        raise PackError(f"source {src} does not exist")
    name = os.path.splitext(os.path.basename(os.path.normpath(src)))[0]  # "data/cats.csv" -> "cats"
    out = out or os.path.join("shards", name)
    src_abs, out_abs = os.path.realpath(src), os.path.realpath(out)
    if src_abs == out_abs or src_abs.startswith(out_abs + os.sep):
        raise PackError(f"output {out} would contain the source {src}")
    if extras and os.path.isdir(src):
        raise PackError("extras come from CSV columns: pack a CSV, not a folder")
    extra_members.check_names(list(extras))
    items, found = scan_folder(src) if os.path.isdir(src) else scan_csv(src, extras)
    if not items:
        raise PackError(f"no image files found in {src}")
    return pack_items(items, list(classes) if classes else found, out, settings,
                      source=os.path.abspath(src))


def summary(manifest: Manifest) -> str:
    """One line for humans: samples per split, shard count, and where problems are listed."""
    splits = " / ".join(f"{k} {v.num_samples}" for k, v in manifest.splits.items())
    shards = sum(len(v.filenames) for v in manifest.splits.values())
    line = f"packed {splits} samples into {shards} shards at {manifest.root}"
    if manifest.folds:
        line += f", train in {manifest.folds['num_folds']} folds"
    if manifest.problematic:
        line += (f"; skipped {manifest.problematic} problematic files, listed in "
                 f"{os.path.join(manifest.root, PROBLEMS_NAME)}")
    return line
