"""``python -m ddp_train.plot``: the same as ``ddp-plot``."""
import sys

from .cli import main

sys.exit(main())
