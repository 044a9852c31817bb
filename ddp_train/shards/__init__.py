"""WebDataset shards for ddp-train: pack image folders or CSVs, index existing shards,
describe and verify them.

* :mod:`ddp_train.shards.manifest` -- the ``_info.json`` format (``load_manifest``, ``Manifest``);
* :mod:`ddp_train.shards.pack` -- ``pack(src, out)`` / ``pack_items(items, classes, out)``;
* :mod:`ddp_train.shards.index` -- ``index(root, out=...)``: a manifest for shards other tools
  wrote (:mod:`.sources` names their files, :mod:`.labels` finds their labels);
* :mod:`ddp_train.shards.tar` -- the tar reader and sample grouping the loader and index share;
* :mod:`ddp_train.shards.report` -- ``info`` tables and sha256 ``verify``;
* ``python -m ddp_train.shards`` / ``ddp-shards`` -- the command line (pack, index, info,
  verify).

The ``pack`` function is deliberately not re-exported here: it would shadow the ``pack``
module (``import ddp_train.shards.pack`` would then give the function).
"""
from .manifest import INFO_NAME, PROBLEMS_NAME, Manifest, SplitInfo, load_manifest, write_manifest

__all__ = ["INFO_NAME", "PROBLEMS_NAME", "Manifest", "SplitInfo", "load_manifest", "write_manifest"]
