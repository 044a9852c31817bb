"""The ``ddp-train`` command line: --help lists the subcommands, the table dispatches them.

In-process except one subprocess that checks ``--help`` stays light (no torch import).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, torchrun_env
from ddp_train import __main__ as cli

NAMES = ["submit", "eval", "predict", "export", "export-weights", "cv", "sweep"]


def help_text(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    return capsys.readouterr().out


def test_help_lists_every_subcommand_with_a_description(capsys):
    out = help_text(capsys, ["--help"])
    assert list(cli.SUBCOMMANDS) == NAMES
    for name, (description, _) in cli.SUBCOMMANDS.items():
        assert description and "\n" not in description
        assert f"\n  {name}" in out and description in out, out
    assert "--config FILE|NAME" in out and "--print-config" in out  # the training options too


@pytest.mark.parametrize("name", NAMES)
def test_each_subcommand_has_its_own_help(capsys, name):
    out = help_text(capsys, [name, "--help"])
    assert out.startswith(f"usage: ddp-train {name}"), out


def test_the_table_dispatches_with_the_remaining_arguments(monkeypatch):
    seen = []
    monkeypatch.setitem(cli.SUBCOMMANDS, "submit", ("x", lambda argv: seen.append(argv) or 7))
    assert cli.main(["submit", "--dry-run", "a=1"]) == 7
    assert seen == [["--dry-run", "a=1"]]


def test_a_subcommand_name_only_counts_first(capsys):
    # After an option the word is an override (and here a malformed one), as before.
    assert cli.main(["--print-config", "submit"]) == 2
    assert "override 'submit': expected dotted.key=value" in capsys.readouterr().err


def test_mistyped_subcommand_is_named(capsys):
    assert cli.main(["sumbit", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("ddp-train: error: unknown subcommand 'sumbit' (did you mean 'submit'? "
                   "ddp-train --help lists them)")


def test_training_command_line_is_unchanged(capsys):
    assert cli.main(["seed=3", "--config", "digits", "--print-config", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3  #" in out and "  epochs: 2  #" in out and "  name: digits  #" in out


def test_help_does_not_import_torch():
    code = ("import sys; from ddp_train.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=torchrun_env(), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "subcommands" in proc.stdout and os.linesep in proc.stdout
