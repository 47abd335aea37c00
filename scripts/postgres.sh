#!/usr/bin/env bash
# A private, throwaway PostgreSQL server for trying distributed sweeps on one machine (and for the
# tests): its data, log and socket in DIR, listening on 127.0.0.1 only, trust authentication
# (anyone on this machine may connect: not for a shared host), one database `optuna`.
#
#   bash scripts/postgres.sh up DIR [PORT]   # start it (PORT: a free one); prints its --storage URL
#   bash scripts/postgres.sh down DIR        # stop it (DIR stays; delete it yourself)
#   bash scripts/postgres.sh install         # apt-get install postgresql, unless initdb is there
#
#   url=$(bash scripts/postgres.sh up /tmp/pg)
#   for i in 0 1; do bash scripts/sweep.sh nano cd --storage "$url" --worker $i & done; wait
#
# $PG_OPTS adds server options to `up` (the tests: -c fsync=off, for a server that lives seconds).
# The server binaries: $PG_BIN, else initdb on PATH, else the newest /usr/lib/postgresql/*/bin
# (Debian and Ubuntu keep them off PATH). PostgreSQL refuses to run as root: as root, the server
# runs as the user `postgres` (the package creates it), which then owns DIR.
set -euo pipefail

bindir() {
  if [ -n "${PG_BIN:-}" ]; then [ -x "$PG_BIN/initdb" ] && echo "$PG_BIN"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  return 1
}

as_server() {  # run a server binary as its owner
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

usage() {
  echo "usage: bash scripts/postgres.sh up DIR [PORT] | down DIR | install" >&2
  exit 2
}

cmd="${1:-}"
case "$cmd" in
  install)
    if bindir >/dev/null; then echo "PostgreSQL is installed: $(bindir)"; exit 0; fi
    sudo=""; if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql >/dev/null
    echo "PostgreSQL installed: $(bindir)"
    ;;
  up)
    [ $# -ge 2 ] || usage
    if ! bin="$(bindir)"; then
      echo "error: no PostgreSQL server binaries (initdb); run: bash scripts/postgres.sh install" >&2
      exit 2
    fi
    dir="$(mkdir -p "$2" && cd "$2" && pwd)"
    port="${3:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
    if [ -e "$dir/data" ]; then echo "error: $dir/data exists; use another DIR or 'down' and delete it" >&2; exit 2; fi
    if [ "$(id -u)" -eq 0 ]; then chown postgres "$dir"; fi
    as_server "$bin/initdb" -D "$dir/data" -U optuna --auth-local=trust --auth-host=trust -E UTF8 --no-sync \
      >"$dir/initdb.log" 2>&1 || { echo "error: initdb failed; see $dir/initdb.log" >&2; exit 1; }
    # -k: the socket in DIR, not /var/run/postgresql (which may not exist or belong to another server).
    as_server "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir ${PG_OPTS:-}" start >/dev/null \
      || { echo "error: the server did not start; see $dir/server.log" >&2; exit 1; }
    as_server "$bin/createdb" -h 127.0.0.1 -p "$port" -U optuna optuna
    echo "postgresql://optuna@127.0.0.1:$port/optuna"
    ;;
  down)
    [ $# -ge 2 ] || usage
    bin="$(bindir)" || { echo "error: no PostgreSQL server binaries (pg_ctl)" >&2; exit 2; }
    # pg_ctl stops the postmaster whose pid is in DIR/data/postmaster.pid: this server only.
    as_server "$bin/pg_ctl" -D "$2/data" -m fast -w stop >/dev/null
    ;;
  *)
    usage
    ;;
esac
