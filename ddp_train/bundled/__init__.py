"""Files that ship inside the package: the sbatch templates and the example configs.

``configs`` and ``slurm`` here are directory symlinks to the repository's top-level ``configs/``
and ``slurm/`` folders, so git holds one copy of each file and ``sbatch slurm/train.sbatch`` and
``--config configs/x.yaml`` keep working from a checkout. An editable install reads through the
links; building a wheel copies the linked files' contents (setup.py's ``package_data``), so a
regular ``pip install`` carries them too. Everything else asks this module, never a path.
"""
from __future__ import annotations

import os
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # importlib.resources.abc is 3.11+; the package supports 3.10
    from importlib.resources.abc import Traversable

# The templates ``ddp-train submit`` renders (setup.py ships exactly these, not cluster.sh).
TEMPLATES = ("train.sbatch", "train_multinode.sbatch")
CONFIG_SUFFIX = ".yaml"


def _folder(kind: str) -> Traversable:
    # files() gives real paths for a normal or editable install, so the links are followed.
    return resources.files(__name__) / kind


def template(name: str) -> str:
    """Text of the sbatch template ``name`` (one of :data:`TEMPLATES`).

    Raises FileNotFoundError when it is missing (a broken install or checkout).
    """
    if name not in TEMPLATES:
        raise FileNotFoundError(f"no bundled sbatch template {name!r} "
                                f"(bundled: {', '.join(TEMPLATES)})")
    entry = _folder("slurm") / name
    if not entry.is_file():
        raise FileNotFoundError(f"bundled sbatch template {name} is missing from the installed "
                                f"package ({entry}); reinstall ddp-train")
    return entry.read_text(encoding="utf-8")


def bundled_configs() -> list[str]:
    """Names of the bundled configs (``configs/NAME.yaml``), sorted; ``--config NAME`` loads one."""
    folder = _folder("configs")
    if not folder.is_dir():
        return []
    return sorted(entry.name[:-len(CONFIG_SUFFIX)] for entry in folder.iterdir()
                  if entry.name.endswith(CONFIG_SUFFIX) and entry.is_file())


def config_path(name: str) -> str | None:
    """File system path of bundled config ``name`` (no ``.yaml``), or None if there is none.

    A path rather than text because the resolved config file is also written into sbatch
    scripts and error messages. pip installs packages as plain files, so this is a real file.
    """
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    entry = _folder("configs") / f"{name}{CONFIG_SUFFIX}"
    return str(entry) if entry.is_file() else None


def bundled_sweeps() -> list[str]:
    """Names of the bundled sweep files (``configs/sweeps/NAME.yaml``), sorted."""
    folder = _folder("configs") / "sweeps"
    if not folder.is_dir():
        return []
    return sorted(entry.name[:-len(CONFIG_SUFFIX)] for entry in folder.iterdir()
                  if entry.name.endswith(CONFIG_SUFFIX) and entry.is_file())


def sweep_path(name: str) -> str | None:
    """File system path of bundled sweep file ``name`` (``ddp-train sweep NAME``), or None."""
    if not name or "/" in name or os.sep in name or name.startswith("."):
        return None
    entry = _folder("configs") / "sweeps" / f"{name}{CONFIG_SUFFIX}"
    return str(entry) if entry.is_file() else None
