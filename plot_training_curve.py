"""Plot training curves of ddp-train runs (the same as ``ddp-plot``; see docs/plotting.md).

    python plot_training_curve.py --log runs/<run>/metrics.jsonl --output plots/ [--report]

Needs numpy, pandas and matplotlib only, not torch: it runs on a laptop or a login node.
"""
import sys

from ddp_train.plot.cli import main

if __name__ == "__main__":
    sys.exit(main())
