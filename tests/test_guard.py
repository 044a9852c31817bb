"""guard.py in isolation: stop signals, the per-step vote, the non-finite counter, the watchdog."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, torchrun_env
from ddp_train.dist import DistInfo
from ddp_train.guard import WATCHDOG_EXIT_CODE, NonFiniteGuard, StopSignals, Watchdog, agree


def test_stop_signals_set_the_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    signals = StopSignals().install()
    try:
        assert signals.received == 0 and signals.name == ""
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a later signal does not replace the first
        assert signals.received == signal.SIGUSR1 and signals.name == "SIGUSR1"
        with pytest.raises(KeyboardInterrupt):  # the second stop request via Ctrl-C is urgent
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGTERM) is before


def test_agree_is_identity_in_one_process():
    assert agree(DistInfo(), [0, 1, 15]) == [0, 1, 15]


def test_nonfinite_guard_counts_consecutive_steps_only():
    guard = NonFiniteGuard(patience=3)
    assert not guard.update(1, False) and not guard.update(2, False)
    assert not guard.update(3, True)  # a finite step resets the streak
    assert not guard.update(4, False) and not guard.update(5, False)
    state = guard.state_dict()
    resumed = NonFiniteGuard(patience=3)
    resumed.load_state_dict(state)
    assert resumed.update(6, False) and resumed.first_bad_step == 4
    never = NonFiniteGuard(patience=0)
    assert not any(never.update(s, False) for s in range(100))


def _python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=torchrun_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_watchdog_dumps_stacks_and_exits(tmp_path):
    code = ("import time\nfrom ddp_train.guard import Watchdog\n"
            f"w = Watchdog(1.0, {str(tmp_path)!r}, rank=3).start()\n"
            "def stuck_in_a_collective():\n    time.sleep(60)\n"
            "for _ in w.watch(range(3)):\n    time.sleep(0.3)  # beats keep it alive\n"
            "stuck_in_a_collective()\n")
    proc = _python(code)
    assert proc.returncode == WATCHDOG_EXIT_CODE, proc.stderr
    dumps = [f for f in os.listdir(tmp_path) if f.startswith("hang-rank3-")]
    assert len(dumps) == 1 and "watchdog" in proc.stderr
    text = open(tmp_path / dumps[0]).read()
    assert "stuck_in_a_collective" in text and "no step completed" in text


def test_watchdog_stays_quiet_while_beating_and_can_be_stopped(tmp_path):
    w = Watchdog(0.5, str(tmp_path), rank=0).start()
    for _ in w.watch(range(10)):
        time.sleep(0.1)
    w.stop()
    time.sleep(0.8)  # stopped: a long pause afterwards must not fire
    assert not os.listdir(tmp_path)
    Watchdog(0, str(tmp_path), rank=0).start().stop()  # 0 = off: no thread at all


def test_loader_workers_ignore_stop_signals():
    code = ("import os, signal\nfrom ddp_train.guard import ignore_stop_signals\n"
            "ignore_stop_signals(0)\n"
            "for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):\n"
            "    os.kill(os.getpid(), s)\nprint('alive')\n")
    proc = _python(code)
    assert proc.returncode == 0 and "alive" in proc.stdout
