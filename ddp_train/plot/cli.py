"""``ddp-plot`` / ``python plot_training_curve.py``: figures (and a report) from run logs.

    ddp-plot --log runs/<run>/metrics.jsonl --output plots/ [--report]
    ddp-plot --log runs/a --log runs/b --output plots/      # two runs on the same axes

``--log`` takes a run folder, its ``metrics.jsonl``, or a text log (``train.log``). Bad input
ends with one ``ddp-plot: error: ...`` line on stderr and exit status 1, never a traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from .logs import LogError, Run, load_run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ddp-plot", description="Plot training curves (and write a report) from the logs of "
        "ddp-train runs. Docs: docs/plotting.md.")
    # extend + nargs: `--log sweeps/x/trials/*` (a shell glob) and repeated --log both overlay.
    parser.add_argument("--log", action="extend", nargs="+", required=True, metavar="PATH",
                        help="run folder(s), metrics.jsonl or train.log; several (or a repeated "
                        "--log) overlay runs")
    parser.add_argument("--output", default="plots", metavar="DIR",
                        help="folder for the PNGs and report.md (default: plots)")
    parser.add_argument("--report", action="store_true", help="also write report.md")
    parser.add_argument("--ema", type=float, default=None, metavar="F",
                        help="EMA smoothing factor in [0, 1), the weight of the previous average "
                        "(default: 1 - 2/(W+1), W the median window)")
    parser.add_argument("--median-window", type=int, default=None, metavar="W",
                        help="rolling-median window in logged steps (default: about 1%% of them, "
                        "at least 5)")
    parser.add_argument("--points", type=int, default=2000, metavar="N",
                        help="bins per drawn line, each keeping its min and max (default 2000)")
    parser.add_argument("--best-metric", choices=("acc", "macro_f1", "loss"), default="acc",
                        help="metric that picks the best eval, as early_stop.metric (default acc)")
    parser.add_argument("--split", default=None, metavar="NAME",
                        help="eval split for the best eval, the per-epoch table and the per-class "
                        "figures, e.g. val_ema (default: val)")
    parser.add_argument("--dpi", type=int, default=120, help="PNG resolution (default 120)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if args.ema is not None and not 0 <= args.ema < 1:
        parser.error("--ema must be in [0, 1)")
    if args.points < 2 or args.dpi < 10 or (args.median_window is not None
                                            and args.median_window < 1):
        parser.error("--points must be >= 2, --dpi >= 10 and --median-window >= 1")
    return args


def load_runs(paths: Sequence[str], split: Optional[str] = None) -> list[Run]:
    """Load each path; runs with the same folder name get ``#2``, ``#3``... for the legend.

    ``split`` (``--split``) must be among each run's eval splits.
    """
    runs = [load_run(path) for path in paths]
    seen: dict = {}
    for run in runs:
        names = sorted({r.get("split") for r in run.evals} - {None})
        if split and split not in names:
            raise LogError(f"{run.source}: no '{split}' evals (the eval splits logged: "
                           f"{', '.join(names) or 'none'})")
        run.split = split
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} #{seen[run.name]}"
    return runs


def run(args: argparse.Namespace) -> None:
    """Load the logs, write the figures and, with ``--report``, report.md."""
    t0 = time.perf_counter()
    runs = load_runs(args.log, args.split)
    # matplotlib only now: bad input fails in half the time (its import is ~0.5 s of ~1 s).
    import matplotlib

    from .figures import Options
    from .render import save_figures
    from .report import write_report

    # Figures are drawn off-screen. Without a backend set, matplotlib resolves one the first time
    # rcParams["backend"] is read (box plots read all rcParams), importing pyplot and, on a
    # desktop, a GUI toolkit.
    matplotlib.use("agg")
    opts = Options(ema=args.ema, median_window=args.median_window, points=args.points,
                   best_metric=args.best_metric, dpi=args.dpi)
    files = save_figures(runs, args.output, opts)
    if args.report:
        files.append(os.path.basename(write_report(runs, args.output, files, opts)))
    steps = sum(len(run.steps) for run in runs)
    print(f"{len(files)} files in {args.output} ({len(runs)} run(s), {steps:,} steps, "
          f"{time.perf_counter() - t0:.1f} s)")


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ddp-plot``; returns the exit status."""
    args = parse_args(argv)
    try:
        run(args)
    except (LogError, OSError) as e:
        if args.debug:
            raise
        print(f"ddp-plot: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a log shape nobody foresaw: still one line, not a traceback
        if args.debug:
            raise
        print(f"ddp-plot: error: {type(e).__name__}: {_one_line(e)} (--debug shows the "
              "traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
