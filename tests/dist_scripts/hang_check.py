"""Under torchrun: the normal ddp_train entry point, except that rank 1 hangs in its 5th step.

The hang is a plain sleep inside ``Engine.step`` (as if a GPU kernel or a collective never
returned); the watchdog must notice, dump the stacks and end both ranks.
"""
import os
import sys
import time

from ddp_train import engine
from ddp_train.__main__ import main

_step = engine.Engine.step


def hang_forever():
    while True:
        time.sleep(1)


def step_then_hang(self):
    if self.micro_step == 4 and self.dist.rank == 1:
        hang_forever()
    return _step(self)


if os.environ.get("RANK") == "1":
    engine.Engine.step = step_then_hang
sys.exit(main(sys.argv[1:]))
