"""What every figure and report shares (run curves, sweep and cv reports): the look, and an
atomic file write. Imports matplotlib only, so the sweep and cv reports do not pull in pandas
through the run-log modules."""
from __future__ import annotations

import os
from typing import Callable

import matplotlib

COLORS = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": "small",
         "axes.titlesize": "medium", "figure.titlesize": "medium"}
STEP_LABEL = "step (optimizer updates)"


def replace_file(path: str, write: Callable) -> None:
    """Write ``path`` through ``write(binary file)`` into a temporary file, then move it over:
    a report rewritten while a sweep or cv runs is never seen half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)  # atomic on POSIX: the old file or the new one, never a mix
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
