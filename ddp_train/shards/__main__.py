"""``ddp-shards`` / ``python -m ddp_train.shards``: pack, index, info and verify WebDataset shards.

Every user error (bad arguments, missing source, non-empty output, no manifest) is one line on
stderr and exit status 2; ``verify`` exits 1 when a shard is missing or changed, ``index`` when
a shard cannot be read (without ``--skip-bad``).
"""
from __future__ import annotations

import argparse
import os
import sys

from rich.console import Console

from . import index as indexer
from .report import class_table, describe, fold_table, split_table, verify
from .manifest import load_manifest
from .pack import PackSettings, pack, summary
from .sources import parse_split_args


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def byte_size(text: str) -> int:
    """``268435456``, ``256M``, ``1.5G`` or ``512k`` -> bytes (binary units)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if text[-1:] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 268435456 or 256M)")


def cmd_pack(args: argparse.Namespace) -> int:
    settings = PackSettings(val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                            seed=args.seed, shard_size=args.shard_size,
                            max_shard_bytes=args.max_shard_bytes, resize=args.resize,
                            workers=args.workers, overwrite=args.overwrite, folds=args.folds,
                            fold_seed=args.fold_seed)
    manifest = pack(args.src, args.out, classes=args.classes, extras=args.extras or (),
                    settings=settings)
    print(summary(manifest))
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    settings = indexer.IndexSettings(label_key=args.label_key, classes=tuple(args.classes or ()),
                                     workers=args.workers, skip_bad=args.skip_bad)
    out = args.out or args.root
    manifest = indexer.index(args.root, out=args.out or "", patterns=parse_split_args(args.split),
                             settings=settings)
    print(indexer.summary(manifest, out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    manifest = load_manifest(args.dir)
    console = Console()
    console.print(describe(manifest))
    console.print(split_table(manifest))
    console.print(class_table(manifest))
    if manifest.folds:
        console.print(fold_table(manifest))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    problems, checked = verify(load_manifest(args.dir))
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"FAILED: {len(problems)} of {checked} shards missing or changed in {args.dir}",
              file=sys.stderr)
        return 1
    print(f"OK: {checked} shards match {args.dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``ddp-shards`` argument parser with its pack, info and verify sub-commands."""
    parser = OneLineParser(prog="ddp-shards", description="Pack images into WebDataset shards, "
                           "index shards another tool wrote, describe and verify them.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack an image folder or a path,label[,split] CSV")
    p.add_argument("src", help="image folder (one sub-folder per class) or CSV file")
    p.add_argument("--out", help="output folder (default: shards/<name of SRC>)")
    p.add_argument("--val-fraction", type=float,
                   help="per class (default 0.1; 0 with --folds, where each fold is a val split)")
    p.add_argument("--test-fraction", type=float, default=0.1, help="per class (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split and shuffle seed (default 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--max-shard-bytes", type=byte_size, default=256 * 2**20,
                   help="start a new shard past this size, e.g. 256M (default)")
    p.add_argument("--resize", type=int, metavar="MAX_SIDE",
                   help="shrink images whose longer side is above MAX_SIDE (default: keep)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="decoding processes (default: all CPUs)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--folds", type=int, default=0, metavar="K",
                   help="split train into K stratified cross-validation folds, one fold per "
                   "shard set (train with data.fold=k); a CSV fold column wins")
    p.add_argument("--fold-seed", type=int, metavar="S",
                   help="seed of the fold assignment (default: --seed)")
    p.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="comma-separated class names in index order (default: all, sorted)")
    p.add_argument("--extras", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="comma-separated CSV columns stored next to each image, e.g. sensor,env "
                   "(.npy path -> <col>.npy; .json path or inline JSON -> <col>.json)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("index", help="write _info.json for WebDataset shards other tools wrote, "
                       "without rewriting them")
    p.add_argument("root", help="folder, URL prefix or pipe: template ({} = file name) of the "
                   "shards")
    p.add_argument("--split", action="append", default=[], metavar="NAME=PATTERN",
                   help="a split's shards by glob or brace pattern relative to ROOT, e.g. "
                   "train='train-{000000..000999}.tar' (repeatable; default: an existing "
                   "_info.json's files, else <split>-*.tar for train, val, validation, test)")
    p.add_argument("--label-key", default="cls", metavar="KEY",
                   help="member holding the label: cls (numbers or names, default), txt, "
                   "json:FIELD (dotted for nested fields)")
    p.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
                   help="comma-separated class names in index order (default: the labels "
                   "found: numbers 0..max, or names sorted)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="shards read at once (default: all CPUs)")
    p.add_argument("--out", help="write _info.json here instead of ROOT (needed for a remote or "
                   "read-only ROOT; the manifest then points at ROOT)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave unreadable shards out of the manifest instead of failing")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("info", help="print a packed dataset's splits and class balance")
    p.add_argument("dir", help="dataset folder holding _info.json")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("verify", help="re-hash every shard against the manifest")
    p.add_argument("dir", help="dataset folder holding _info.json")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ddp-shards``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except indexer.IndexFailed as e:  # shards that cannot be read: listed, nothing written
        print(f"ddp-shards: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # PackError is a ValueError; no traceback for user errors
        print(f"ddp-shards: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddp-shards: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
