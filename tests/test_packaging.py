"""A built wheel works on its own: bundled configs and sbatch templates, run outside the checkout.

The wheel is built from a copy of the working tree (so the checkout gets no ``build/`` folder)
and installed with pip, offline, into a fresh venv. That venv sees the dependencies (torch,
timm, yaml, ...) of the test's own environment through a ``.pth`` file holding its
site-packages as a plain path line: site appends the folder to sys.path without executing the
``.pth`` files inside it, so the editable install of ddp_train there (a meta-path finder pointing
at the checkout) stays inactive. Every command then runs from a folder outside the checkout.
Takes ~15 s (wheel build, venv, pip install; --print-config and submit --dry-run import no torch).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
import yaml

from conftest import ROOT
from ddp_train.config import Config, from_dict
from ddp_train.submit import BODY_MARKER

pytest.importorskip("setuptools")  # --no-build-isolation builds with this environment's

# What a wheel is built from; setup.py reads README.md for the long description.
SOURCES = ("setup.py", "README.md", "ddp_train", "configs", "slurm")


def run(cmd: list[str], cwd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` with no path into the checkout (no PYTHONPATH); fail with its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv folder, its bin folder, a working folder outside the checkout, the wheel path)."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):  # symlinks=True: ddp_train/bundled/* stay links into the copy
            shutil.copytree(path, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(dist), str(src)], cwd=str(tmp))
    (wheel,) = glob.glob(str(dist / "*.whl"))

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=str(tmp))
    python = str(venv / "bin" / "python")
    # pip from this environment, running as the fresh interpreter: it installs there and sees
    # only that venv (the .pth below is not written yet), so it never meets the editable install.
    run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
         "--no-index", wheel], cwd=str(tmp))
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=str(tmp)).stdout.strip()
    with open(os.path.join(purelib, "_test_deps.pth"), "w", encoding="utf-8") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")  # a path line, never an import line
    work = tmp / "elsewhere"
    work.mkdir()
    return str(venv), str(venv / "bin"), str(work), wheel


def test_wheel_holds_the_bundled_files_as_files(installed):
    _, _, _, wheel = installed
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in names:  # a symlink would be stored with S_IFLNK in the high mode bits
            assert (z.getinfo(name).external_attr >> 16) & 0o170000 != 0o120000, name
    configs = {f"ddp_train/bundled/configs/{os.path.basename(p)}"
               for p in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert configs and configs <= names, configs - names
    sweeps = {f"ddp_train/bundled/configs/sweeps/{os.path.basename(p)}"
              for p in glob.glob(os.path.join(ROOT, "configs", "sweeps", "*.yaml"))}
    assert len(sweeps) == 3 and sweeps <= names, sweeps - names
    assert {"ddp_train/bundled/slurm/train.sbatch",
            "ddp_train/bundled/slurm/train_multinode.sbatch"} <= names
    assert "ddp_train/bundled/slurm/cluster.sh" not in names  # test infrastructure, not shipped


def test_installed_package_is_the_wheel_not_the_checkout(installed):
    venv, bin_dir, work, _ = installed
    where = run([os.path.join(bin_dir, "python"), "-c",
                 "import ddp_train, ddp_train.bundled as b; print(ddp_train.__file__); "
                 "print(b.config_path('digits'))"], cwd=work).stdout.split("\n")
    real_venv = os.path.realpath(venv)
    assert os.path.realpath(where[0]).startswith(real_venv + os.sep), where
    assert not os.path.realpath(where[0]).startswith(os.path.realpath(ROOT) + os.sep), where
    assert os.path.realpath(where[1]).startswith(real_venv + os.sep), where
    assert not os.path.islink(where[1])  # a copy of the file, not a link back into a checkout


def test_print_config_of_a_bundled_name(installed):
    _, bin_dir, work, _ = installed
    proc = run([os.path.join(bin_dir, "ddp-train"), "--config", "digits", "--print-config"],
               cwd=work)
    cfg = from_dict(Config, yaml.safe_load(proc.stdout))
    assert cfg == Config() and cfg.run.name == "digits"
    assert os.listdir(work) == []  # validated only: no run folder, no shards


def test_submit_dry_run_renders_the_bundled_templates(installed):
    venv, bin_dir, work, _ = installed
    for nodes, name in ((1, "train.sbatch"), (2, "train_multinode.sbatch")):
        proc = run([os.path.join(bin_dir, "ddp-train"), "submit", "--config", "digits",
                    "--nodes", str(nodes), "--dry-run"], cwd=work)
        script = proc.stdout
        with open(os.path.join(ROOT, "slurm", name), encoding="utf-8") as f:
            template = f.read()
        assert script.endswith(template[template.index(BODY_MARKER):])  # the real template
        assert f"from slurm/{name}." in script
        assert "#SBATCH --job-name=digits" in script and f"#SBATCH --nodes={nodes}" in script
        # The bundled name is baked in as the installed file, which the job's python can read.
        set_line = next(line for line in script.splitlines() if line.startswith("set -- "))
        config = set_line.split()[2]
        assert os.path.realpath(config).startswith(os.path.realpath(venv) + os.sep), set_line
        assert config.endswith(os.path.join("bundled", "configs", "digits.yaml"))
    assert os.listdir(work) == []  # --dry-run writes nothing


def test_sweep_slurm_dry_run_of_a_bundled_sweep(installed):
    """``ddp-train sweep digits`` finds the installed sweep file; --dry-run renders the workers'
    script from the installed template and writes nothing (no Optuna needed for that)."""
    venv, bin_dir, work, _ = installed
    script = run([os.path.join(bin_dir, "ddp-train"), "sweep", "digits", "--slurm", "--array",
                  "3", "--gpus", "0", "--dry-run"], cwd=work).stdout
    assert "#SBATCH --array=0-2" in script and "#SBATCH --job-name=sweep-digits" in script
    sweep_file = next(line.split("=", 1)[1] for line in script.splitlines()
                      if line.startswith("export SWEEP_FILE="))
    assert os.path.realpath(sweep_file).startswith(os.path.realpath(venv) + os.sep)
    assert sweep_file.endswith(os.path.join("bundled", "configs", "sweeps", "digits.yaml"))
    assert os.listdir(work) == []


def test_help_lists_the_subcommands(installed):
    _, bin_dir, work, _ = installed
    out = run([os.path.join(bin_dir, "ddp-train"), "--help"], cwd=work).stdout
    for name in ("submit", "eval", "predict", "export", "export-weights", "cv",
                 "sweep"):
        assert f"\n  {name} " in out, out
