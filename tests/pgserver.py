"""A real PostgreSQL server for tests (launch/postgres.sh), e.g. as an Optuna study storage.

Use the module-scoped fixture in a test module::

    from pgserver import postgres  # noqa: F401  (pytest finds the fixture by its name)

    def test_sweep(postgres):
        url = postgres("sweep_resume")  # a fresh, empty database; its SQLAlchemy URL
        study = optuna.create_study(study_name="s", storage=url)

``postgres_url(name)`` creates a database if missing (keeping its contents) and returns its URL,
for a server that is already running. Needs root (the script starts the server as the postgres
user through runuser) and PostgreSQL installed or installable with apt-get; the fixture skips
with the reason otherwise. A server the fixture started is stopped afterwards; one that was
already running is left as it was. PG_LOCAL_STATE and PG_PORT reach the script unchanged.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "launch", "postgres.sh")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")  # the script's rule: no quoting needed anywhere


def _bindir() -> str | None:
    """The folder of initdb/pg_ctl/psql, found as launch/postgres.sh finds it (None: missing)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: [int(p) if p.isdigit() else 0 for p in d.split("/")[-2].split(".")],
                  reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        dirs.append(os.path.dirname(os.path.realpath(initdb)))
    for d in dirs:
        if all(os.access(os.path.join(d, c), os.X_OK) for c in ("initdb", "pg_ctl", "psql")):
            return d
    return None


def _script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def server_running() -> bool:
    """Whether our server (PG_LOCAL_STATE's) is up: the script's status exits 0, else 3."""
    return _script("status").returncode == 0


def postgres_url(dbname: str) -> str:
    """Create ``dbname`` on the running server if missing and return its SQLAlchemy URL."""
    proc = _script("url", dbname)
    if proc.returncode != 0:
        raise RuntimeError(f"launch/postgres.sh url {dbname} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def fresh_db(dbname: str) -> str:
    """Drop ``dbname`` (ending its open connections) and create it empty; return its URL.

    A rerun, or a test after one that left a study behind, starts from an empty database.
    """
    if not _NAME.fullmatch(dbname):
        raise ValueError(f"database name {dbname!r}: use 1-63 of [A-Za-z0-9_-]")
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed (no initdb/pg_ctl/psql found)")
    port = os.environ.get("PG_PORT", "55432")
    # DROP DATABASE refuses while anyone is connected (a previous test's SQLAlchemy pool, a
    # killed worker's session): end those sessions first. Two -c: one -c with both statements
    # is one transaction, which DROP DATABASE refuses. TCP on 127.0.0.1, trust auth.
    terminate = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{dbname}'"
    proc = subprocess.run([os.path.join(bindir, "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                           "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "postgres",
                           "-c", terminate, "-c", f'DROP DATABASE IF EXISTS "{dbname}"'],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(f"dropping database {dbname} failed: {proc.stderr.strip()}")
    return postgres_url(dbname)


@pytest.fixture(scope="module")
def postgres():
    """A running local PostgreSQL; yields ``make_db(name) -> url``: a fresh database's URL."""
    if os.geteuid() != 0:
        pytest.skip("PostgreSQL tests need root: launch/postgres.sh runs the server via runuser")
    installed = _bindir() is not None
    if not installed and not shutil.which("apt-get"):
        pytest.skip("PostgreSQL is not installed and there is no apt-get to install it")
    was_running = server_running()
    proc = _script("start", timeout=300)
    if proc.returncode != 0:
        if not installed and "apt-get install" in proc.stderr:
            pytest.skip(f"PostgreSQL could not be installed: {proc.stderr.strip()}")
        pytest.fail(f"launch/postgres.sh start failed:\n{proc.stdout}\n{proc.stderr}")
    yield fresh_db
    if not was_running:  # later tests and other users get the machine back as it was
        _script("stop")
