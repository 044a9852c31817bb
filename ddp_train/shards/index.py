"""``ddp-shards index``: a ddp-train manifest for WebDataset shards other tools wrote.

Each shard is read once, as a stream, and never rewritten: the scan groups its members into
samples exactly as the loader does (:func:`ddp_train.shards.tar.tar_samples`), counts the samples
that hold an image and a label (:mod:`.labels`), tallies their labels and hashes the bytes on
the way. The flow:

1. name the shard sets (:mod:`.sources`) and read the progress file of an earlier, interrupted
   run: shards already indexed there are not read again;
2. scan the rest in a process pool, appending one line per finished shard to the progress file;
3. settle the class list (``--classes``, or every label seen: numbers 0..max, names sorted);
4. write ``problematic_files.jsonl`` and then ``_info.json`` (both atomically), completing an
   existing timm ``_info.json`` rather than dropping its keys.

A shard that cannot be read (missing, truncated, not a tar) fails the index, after the others
have been scanned, unless ``--skip-bad`` leaves it out.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .. import __version__
from .labels import LabelError, LabelSpec, has_image, raw_label
from .locations import HashingReader, open_stream
from .manifest import (INFO_NAME, PROBLEMS_NAME, Manifest, SplitInfo, is_remote, join, read_doc,
                       write_atomic, write_manifest)
from .progress import PROGRESS_MODES, FileProgress
from .sources import shard_sets
from .tar import tar_samples

PROGRESS_NAME = "_index_progress.jsonl"  # one line per indexed shard: what a re-run skips


class IndexingError(ValueError):
    """A problem with the arguments or the shards; the CLI prints it as one line."""


class IndexFailed(IndexingError):
    """Shards could not be read and ``--skip-bad`` was not given (exit status 1)."""


@dataclass(frozen=True)
class IndexSettings:
    """How to index: where labels are, the class names, parallelism, and bad-shard policy."""

    label_key: str = "cls"  # member holding the label: cls, txt, json:FIELD, ...
    classes: tuple[str, ...] = ()  # class names in index order; () = collect them
    workers: int = 0  # scanning processes; 0 = every CPU
    skip_bad: bool = False  # leave unreadable shards out of the manifest instead of failing
    progress: str = "auto"  # auto, bar, lines or none (as for pack)

    def __post_init__(self) -> None:
        LabelSpec.parse(self.label_key)  # a ValueError names --label-key
        if len(set(self.classes)) != len(self.classes):
            raise IndexingError("--classes names a class twice")
        if self.workers < 0:
            raise IndexingError(f"--workers must be at least 1, got {self.workers}")
        if self.progress not in PROGRESS_MODES:
            raise IndexingError(f"progress must be one of {', '.join(PROGRESS_MODES)}")


def scan_shard(job: tuple[str, str, str, tuple[str, ...]]) -> dict[str, Any]:
    """Read one shard: ``{"name", "count", "sha256", "bytes", "labels", "problems"}``, or
    ``{"name", "error"}`` when it cannot be read. Runs in a pool worker.

    ``labels`` is ``[[value, samples], ...]`` (values are class numbers or names); a problem is
    ``{"key", "problem"}`` for a sample without an image or a label; ``stat`` is the local
    file's (size, mtime_ns), None for a remote one.
    """
    name, url, label_key, classes = job
    spec, known = LabelSpec.parse(label_key), set(classes)
    count, labels, problems, keys = 0, Counter(), [], set()
    stat = _stat(url)  # before reading: a shard replaced meanwhile is read again next time
    try:
        with open_stream(url) as raw_stream:
            stream = HashingReader(raw_stream)
            for raw in tar_samples(stream, strict=True):  # grouped as the loader groups them
                key = raw["__key__"]
                if key in keys:  # the loader would split this sample the same way
                    problems.append({"key": key, "problem": "key seen earlier in this shard: "
                                     "a sample's members must be next to each other (write "
                                     "the tar from a sorted file list, e.g. tar --sort=name)"})
                keys.add(key)
                if not has_image(raw):
                    members = ", ".join(sorted(k for k in raw if not k.startswith("__")))
                    problems.append({"key": key, "problem": f"no image (members: {members})"})
                    continue
                try:
                    value = raw_label(raw, spec)
                    if classes and not _known(value, classes, known):
                        raise LabelError(f"{spec}: {value!r} is not one of --classes")
                except LabelError as e:
                    problems.append({"key": key, "problem": f"no label: {e}"})
                    continue
                labels[value] += 1
                count += 1
            digest = stream.drain()  # the bytes after the end-of-archive block count too
    except Exception as e:  # any failure to read is the shard's, reported with its name
        return {"name": name, "error": f"{type(e).__name__}: {e}"}
    return {"name": name, "count": count, "sha256": digest,
            "bytes": stream.bytes, "labels": sorted(labels.items(), key=lambda kv: str(kv[0])),
            "problems": problems, "stat": stat}


def _known(value: int | str, classes: tuple[str, ...], known: set[str]) -> bool:
    """Whether ``value`` names one of ``--classes``: a number below their count, or a name."""
    return value < len(classes) if isinstance(value, int) else value in known


def _stat(url: str) -> list[int] | None:
    """(size, mtime_ns) of a local shard, to tell a re-run when it changed; None for remote."""
    if is_remote(url):
        return None
    try:
        st = os.stat(url)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


class Progress:
    """The progress file: a header with the settings, then one JSON line per indexed shard.

    Lines are appended and fsync'd as shards finish, so an interrupted index loses at most the
    shards being read at that moment. A header for other settings (root, label key, classes)
    starts the file over: those results would not apply.
    """

    def __init__(self, out: str, header: dict[str, Any]) -> None:
        self.path, self.header = os.path.join(out, PROGRESS_NAME), header
        self.done: dict[str, dict[str, Any]] = {}
        self.restarted = False
        lines = []
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except ValueError:  # a line cut short by the interruption
                        continue
        if lines and lines[0] == {"header": header}:
            self.done = {rec["name"]: rec for rec in lines[1:] if "name" in rec}
        else:
            self.restarted = bool(lines)
            with open(self.path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": header}) + "\n")

    def add(self, record: dict[str, Any]) -> None:
        """Record one indexed shard, durably."""
        self.done[record["name"]] = record
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def settle_classes(values: set[int | str], classes: tuple[str, ...]) -> tuple[list[str], str]:
    """The class names in index order and the label kind (``index`` or ``name``)."""
    numbers = sorted(v for v in values if isinstance(v, int))
    names = sorted(str(v) for v in values if not isinstance(v, int))
    if numbers and names:
        raise IndexingError(f"labels mix class numbers ({numbers[0]}, ...) and names "
                          f"({names[0]!r}, ...); use one kind, or a member that holds names")
    if classes:
        return list(classes), "name" if names else "index"
    if names:
        return names, "name"
    return [str(i) for i in range(numbers[-1] + 1 if numbers else 0)], "index"


def _write_problems(out: str, lines: list[dict[str, Any]]) -> str:
    path = os.path.join(out, PROBLEMS_NAME)
    write_atomic(path, "".join(json.dumps(line) + "\n" for line in lines))
    return path


def _scan_all(jobs: list[tuple[str, str, str, tuple[str, ...]]], workers: int, mode: str,
              progress: Progress) -> dict[str, str]:
    """Scan ``jobs``, recording each indexed shard as it finishes; ``{name: error}`` of the
    shards that could not be read (not recorded: a re-run tries them again)."""
    failed: dict[str, str] = {}
    # The pool forks before the progress bar starts its refresh thread (as pack does); with one
    # worker or one shard the scan runs in this process.
    pool = multiprocessing.Pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
    try:
        with FileProgress(len(jobs), mode, unit="shards", verb="indexed") as bar:
            results = pool.imap_unordered(scan_shard, jobs) if pool else map(scan_shard, jobs)
            for result in results:  # in finishing order: each is recorded as soon as it is done
                if "error" in result:
                    failed[result["name"]] = result["error"]
                else:
                    progress.add(result)
                bar.advance()
    finally:
        if pool is not None:
            pool.terminate()  # also on Ctrl-C: nothing half-read survives, the file has the rest
            pool.join()
    return failed


def index(root: str, *, out: str = "", patterns: dict[str, str] | None = None,
          settings: IndexSettings = IndexSettings()) -> Manifest:
    """Index the shards under ``root`` and write ``out/_info.json`` (``out`` defaults to
    ``root``, which must then be a local folder). Returns the manifest written.

    Raises :class:`IndexingError` for bad arguments, :class:`IndexFailed` when shards cannot be
    read without ``settings.skip_bad``.
    """
    if not is_remote(root):
        root = root.rstrip("/") or "/"  # "DIR/" and "DIR" are one root for the progress file
    out = _output_folder(root, out)
    base = _existing_doc(out, root)  # a timm _info.json to complete, or None
    try:
        sets, origin = shard_sets(root, patterns or {}, base)  # {split: [shard names]}
    except ValueError as e:
        raise IndexingError(str(e)) from None
    names = [n for names in sets.values() for n in names]

    # 1. what an earlier run of the same command already read (local shards: unchanged since)
    progress = Progress(out, {"root": root, "label_key": settings.label_key,
                              "classes": list(settings.classes)})
    if progress.restarted:
        print(f"{PROGRESS_NAME}: written with other settings; indexing every shard again")
    todo = [n for n in names if n not in progress.done
            or progress.done[n].get("stat") != _stat(join(root, n))]
    if len(todo) < len(names):
        print(f"{len(names) - len(todo)} of {len(names)} shards already indexed "
              f"({PROGRESS_NAME}); reading the other {len(todo)}")

    # 2. read the rest; each finished shard is in the progress file before the next is counted
    workers = settings.workers or os.cpu_count() or 1
    jobs = [(n, join(root, n), settings.label_key, settings.classes) for n in todo]
    try:
        failed = _scan_all(jobs, workers, settings.progress, progress)
    except KeyboardInterrupt:
        print(f"interrupted with {len(progress.done)} of {len(names)} shards indexed "
              f"({os.path.join(out, PROGRESS_NAME)}); the same command continues from there",
              file=sys.stderr)
        raise

    # 3. unreadable shards fail the index, or with --skip-bad leave the manifest
    problems = [{"split": split, "shard": n, "key": None, "problem": failed[n]}
                for split, ns in sets.items() for n in ns if n in failed]
    problems += [{"split": split, "shard": n, **p} for split, ns in sets.items() for n in ns
                 if n not in failed for p in progress.done[n]["problems"]]
    if failed and not settings.skip_bad:
        path = _write_problems(out, problems)
        first = next(iter(failed))
        raise IndexFailed(f"{len(failed)} of {len(names)} shards cannot be read ({first}: "
                          f"{failed[first]}; all in {path}); no manifest written. Re-run with "
                          "--skip-bad to index without them")
    sets = {split: [n for n in ns if n not in failed] for split, ns in sets.items()}

    # 4. classes from every label seen, then the manifest; problems first, manifest last
    values = {v for ns in sets.values() for n in ns for v, _ in progress.done[n]["labels"]}
    classes, kind = settle_classes(values, settings.classes)
    spec = LabelSpec.parse(settings.label_key)
    manifest = Manifest(
        root=root, classes=classes, problematic=len(problems),
        splits={split: _split_info(split, ns, progress.done, classes, kind)
                for split, ns in sets.items()},
        label={"member": spec.member, "field": spec.field, "kind": kind},
        index=dict(root=root, label_key=settings.label_key, shard_sets=origin, workers=workers,
                   skipped_shards=sorted(failed), created=_now(), ddp_train_version=__version__),
        shard_root=_shard_root(root, out))
    _write_problems(out, problems)
    write_manifest(manifest, out, base)
    return manifest


def _output_folder(root: str, out: str) -> str:
    """Where ``_info.json`` goes (``out``, else ``root``), created; IndexingError if it cannot."""
    if not out:
        if is_remote(root):
            raise IndexingError(f"{root} is not a local folder: write the index elsewhere with "
                                "--out DIR")
        out = root
    if not is_remote(root) and not os.path.isdir(root):
        raise IndexingError(f"{root} is not a folder")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise IndexingError(f"{out} is not writable: write the index elsewhere with --out DIR")
    return out


def _shard_root(root: str, out: str) -> str:
    """The manifest's ``shard_root``: '' beside the shards, else the root as given (remote) or
    relative to ``out`` (local, so the two folders can move together)."""
    if not is_remote(root) and os.path.abspath(out) == os.path.abspath(root):
        return ""
    return root if is_remote(root) else os.path.relpath(os.path.abspath(root),
                                                        os.path.abspath(out))


def _split_info(split: str, names: list[str], done: dict[str, dict], classes: list[str],
                kind: str) -> SplitInfo:
    slot = {c: i for i, c in enumerate(classes)}
    per_shard = []
    for n in names:
        counts = [0] * len(classes)
        for value, k in done[n]["labels"]:
            counts[value if kind == "index" else slot[str(value)]] += k
        per_shard.append(counts)
    lengths = [done[n]["count"] for n in names]
    return SplitInfo(split, sum(lengths), list(names), lengths,
                     sha256=[done[n]["sha256"] for n in names],
                     class_counts=[sum(c) for c in zip(*per_shard)] or [0] * len(classes),
                     shard_class_counts=per_shard)


def _existing_doc(out: str, root: str) -> dict[str, Any] | None:
    """The ``_info.json`` to complete: the one in ``out``, else the one beside the shards."""
    for where in dict.fromkeys([out, root]):
        try:
            return read_doc(where)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            if is_remote(where):  # e.g. a pipe: command that found no file: treat as none
                continue
            raise IndexingError(f"existing {join(where, INFO_NAME)}: {e}") from None
    return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat("T", "seconds")


def summary(manifest: Manifest, out: str) -> str:
    """The closing lines of ``ddp-shards index``."""
    splits = ", ".join(f"{s.name} {s.num_samples} in {len(s.filenames)} shards"
                       for s in manifest.splits.values())
    lines = [f"indexed {splits}; {manifest.num_classes} classes ({manifest.label['kind']}s from "
             f"{manifest.index['label_key']}); wrote {os.path.join(out, INFO_NAME)}"]
    if manifest.index["skipped_shards"]:
        lines.append(f"left out {len(manifest.index['skipped_shards'])} unreadable shards "
                     f"(--skip-bad): {', '.join(manifest.index['skipped_shards'][:5])}")
    if manifest.problematic:
        lines.append(f"{manifest.problematic} problems listed in "
                     f"{os.path.join(out, PROBLEMS_NAME)}")
    return "\n".join(lines)
