#!/usr/bin/env bash
# A throw-away PostgreSQL server on this one machine, for the hyperparameter-sweep tests and for
# trying a sweep by hand: Optuna keeps its study in it (several worker processes, or nodes, share
# one study through it). Run as root; the server itself runs as the `postgres` user (initdb and
# postgres refuse to run as root), started with runuser.
#
#   launch/postgres.sh start          # install (apt-get) if missing, initdb once, start the server
#   launch/postgres.sh status         # running or not; exit status 0 running, 3 stopped
#   launch/postgres.sh url [DBNAME]   # create DBNAME (default ddp_train) if missing and print
#                                     # postgresql+psycopg://postgres@127.0.0.1:PORT/DBNAME
#   launch/postgres.sh stop           # stop the server (fast mode; the state folder stays)
#   export OPTUNA_STORAGE=$(launch/postgres.sh url sweep)
#
# Idempotent: `start` on a running server only checks it answers; `stop` on a stopped one does
# nothing; `url` on an existing database only prints the URL.
# Authentication is `trust` (any local user may connect as any role, no password) and the server
# listens on 127.0.0.1 only: fine on a single throw-away test host nobody else logs into, never
# acceptable on a shared machine or a real database server.
# PG_LOCAL_STATE (default /tmp/ddp-train-postgres) holds the data folder, the socket folder and
# the server log; PG_PORT (default 55432, away from a system server's 5432) is the TCP port.
set -euo pipefail

STATE=${PG_LOCAL_STATE:-/tmp/ddp-train-postgres}
PORT=${PG_PORT:-55432}
DATA=$STATE/data
SOCK=$STATE/sock  # our own socket folder: a system server's /var/run/postgresql is not touched
LOG=$STATE/postgres.log
BIN=

die() { echo "postgres.sh: $*" >&2; exit 1; }

find_bin() {
  # Debian keeps the server binaries out of PATH (/usr/lib/postgresql/VERSION/bin; /usr/bin has
  # only the pg_wrapper front-ends, which look for Debian-managed clusters): take the newest
  # version there, else the folder of an initdb on PATH (other distributions, source builds).
  local dir initdb
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/psql ]] && { BIN=$dir; return 0; }
  done
  initdb=$(command -v initdb) || return 1
  dir=$(dirname "$(readlink -f "$initdb")")
  [[ -x $dir/pg_ctl && -x $dir/psql ]] && { BIN=$dir; return 0; }
  return 1
}

install_packages() {
  find_bin && return 0
  [[ $(id -u) == 0 ]] || die "PostgreSQL is not installed and installing it needs root"
  command -v apt-get >/dev/null || die "PostgreSQL is not installed and there is no apt-get"
  # --no-install-recommends keeps it to the server and the client; a failure with an outdated
  # package index is retried once after `apt-get update`. Debian's package may create and start
  # its own cluster on port 5432: ours is separate (own data folder, socket folder and port).
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql \
    >"$STATE/apt.log" 2>&1 \
    || { apt-get update >>"$STATE/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends postgresql >>"$STATE/apt.log" 2>&1; } \
    || die "apt-get install postgresql failed, see $STATE/apt.log"
  find_bin || die "apt-get installed postgresql but no initdb/pg_ctl/psql was found"
}

# Run as the postgres user from /, not from the caller's folder (often /root, which postgres
# cannot enter: initdb and pg_ctl then warn or fail on "could not change directory").
as_pg() { (cd / && runuser -u postgres -- "$@"); }

# "Ours is up" means our socket answers: another server on the same port (another state folder)
# does not count, and `start` then fails on the busy port with the reason in the log.
answers() { [[ -n $BIN ]] && "$BIN/pg_isready" -q -h "$SOCK" -p "$PORT" -t 2 2>/dev/null; }

# pg_ctl refuses to run as root; `status` exits 0 when the postmaster.pid is live, 3 otherwise.
running() {
  [[ -n $BIN && -f $DATA/PG_VERSION ]] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

psql_q() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$PORT" -U postgres "$@"; }

start() {
  [[ $(id -u) == 0 ]] || die "must run as root (the server runs as the postgres user via runuser)"
  # A socket path is limited to 107 bytes (sun_path); fail here rather than in the server log.
  (( ${#SOCK} + 16 <= 107 )) || die "PG_LOCAL_STATE=$STATE is too long for a socket path"
  mkdir -p "$STATE"
  install_packages
  id -u postgres >/dev/null 2>&1 || die "there is no postgres user (it comes with the package)"
  if answers; then
    echo "PostgreSQL already up on 127.0.0.1:$PORT (data $DATA)"
    return 0
  fi
  # The postgres user writes the data folder, the socket and the log: it owns the state folder
  # (root's mkdir made it root's), and must be able to reach it (PG_LOCAL_STATE under /root
  # would not do).
  chown postgres:postgres "$STATE"
  as_pg test -w "$STATE" \
    || die "the postgres user cannot write $STATE: choose another PG_LOCAL_STATE"
  as_pg mkdir -p "$SOCK"
  if [[ ! -f $DATA/PG_VERSION ]]; then
    # No PG_VERSION: no data folder yet, or one left half-written by an interrupted initdb.
    rm -rf "$DATA"
    # --no-locale/UTF8: the same collation whatever the host's locale; --no-sync: no fsync of
    # the new folder (~1 s), harmless for a throw-away server. ~2 s in all.
    as_pg "$BIN/initdb" -D "$DATA" -U postgres --auth=trust --encoding=UTF8 --no-locale \
      --no-sync >"$STATE/initdb.log" 2>&1 || die "initdb failed, see $STATE/initdb.log"
  fi
  # A stale postmaster.pid from a killed server is handled by pg_ctl itself. listen_addresses
  # keeps TCP on the loopback only; fsync=off trades crash safety (irrelevant for test data
  # under /tmp) for fast commits, as Optuna commits once per trial state change.
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
    -o "-p $PORT -k $SOCK -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null \
    || die "the server did not start (port $PORT busy? see $LOG):
$(tail -n 5 "$LOG" 2>/dev/null)"
  answers || die "the server started but does not answer on $SOCK port $PORT, see $LOG"
  echo "PostgreSQL up on 127.0.0.1:$PORT (data $DATA); URL: $0 url DBNAME"
}

stop() {
  find_bin || { echo "PostgreSQL is not installed: nothing to stop"; return 0; }
  if ! running; then
    echo "PostgreSQL not running (state in $STATE)"
    return 0
  fi
  # fast: roll back open transactions and disconnect clients instead of waiting for them
  # (a test's leftover connection pool would otherwise hold the default "smart" stop forever).
  as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null \
    || die "pg_ctl stop failed, see $LOG"
  echo "PostgreSQL stopped (state kept in $STATE)"
}

status() {
  find_bin || { echo "PostgreSQL: not installed"; return 3; }
  if running; then
    echo "PostgreSQL: running (pid $(head -n 1 "$DATA/postmaster.pid"), 127.0.0.1:$PORT," \
      "data $DATA)"
    answers && echo "accepting connections" || echo "not accepting connections (yet?), see $LOG"
    psql_q -d postgres -tAc \
      "SELECT 'databases: ' || string_agg(datname, ' ' ORDER BY datname) FROM pg_database
       WHERE NOT datistemplate" 2>/dev/null || true
    return 0
  fi
  echo "PostgreSQL: stopped (state in $STATE)"
  return 3
}

url() {
  local db=${1:-ddp_train} exists
  # Names that need no quoting in SQL identifiers, shell words or URLs; 63 bytes is the limit.
  [[ $db =~ ^[A-Za-z0-9_-]{1,63}$ ]] || die "database name '$db': use 1-63 of [A-Za-z0-9_-]"
  find_bin && answers || die "PostgreSQL is not running on $SOCK port $PORT: run $0 start"
  exists=$(psql_q -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'")
  if [[ $exists != 1 ]]; then
    # Two callers may race to create it: the loser's error is fine if the database now exists.
    "$BIN/createdb" -h "$SOCK" -p "$PORT" -U postgres "$db" 2>/dev/null \
      || [[ $(psql_q -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'") == 1 ]] \
      || die "createdb $db failed, see $LOG"
    echo "created database $db" >&2
  fi
  # Only the URL on stdout, for $(...); psycopg 3 is SQLAlchemy's "postgresql+psycopg" driver.
  echo "postgresql+psycopg://postgres@127.0.0.1:$PORT/$db"
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  status) status ;;
  url) url "${2:-}" ;;
  *) echo "usage: $0 start|stop|status|url [DBNAME]" >&2; exit 2 ;;
esac
