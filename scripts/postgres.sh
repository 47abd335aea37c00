#!/usr/bin/env bash
# A private, throwaway PostgreSQL server for trying distributed sweeps on one machine (and for the
# tests): everything in DIR, listening on 127.0.0.1 only, one database `optuna` owned by the role
# `optuna`, which logs in with a generated password and is no superuser.
#
#   bash scripts/postgres.sh up DIR [PORT]   # start it (PORT: a free one); prints its --storage URL
#   bash scripts/postgres.sh down DIR        # stop it (DIR stays; delete it yourself)
#   bash scripts/postgres.sh install         # apt-get install postgresql, unless initdb is there
#
#   url=$(bash scripts/postgres.sh up /tmp/pg)
#   for i in 0 1; do bash scripts/sweep.sh nano cd --storage "$url" --worker $i & done; wait
#
# DIR must be new (or an empty folder of yours); `up` refuses anything else and never changes the
# owner or mode of a folder it did not create. In it:
#   password   the role's password (mode 0600, yours)
#   pgpass     the same as a libpq password file (0600): the printed URL names it (?passfile=),
#              so no password is ever on a command line; `export PGPASSFILE=DIR/pgpass` serves
#              psql and other clients
#   server/    data, logs and the server's socket folder (0700, the server's user only)
# Who can do what: TCP connections (127.0.0.1 only) need a password (scram-sha-256); the role
# `optuna` owns its database and nothing else (no superuser, no CREATEDB/CREATEROLE, so no
# COPY ... TO PROGRAM). The socket, in server/socket (0700), admits only the server's own OS user,
# as the superuser (peer authentication); its password is random and thrown away.
#
# $PG_OPTS adds server options to `up` (the tests: -c fsync=off, for a server that lives seconds).
# The server binaries: $PG_BIN, else initdb on PATH, else the newest /usr/lib/postgresql/*/bin
# (Debian and Ubuntu keep them off PATH). PostgreSQL refuses to run as root: as root, the server
# runs as the user `postgres` (the package creates it), which owns DIR/server (DIR stays root's,
# mode 0711 when `up` makes it, so that `postgres` can reach DIR/server).
set -euo pipefail

bindir() {
  if [ -n "${PG_BIN:-}" ]; then [ -x "$PG_BIN/initdb" ] && echo "$PG_BIN"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
  local d
  d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  return 1
}

as_server() {  # run a command as the server's OS user
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

die() { echo "error: $*" >&2; exit 2; }

usage() {
  echo "usage: bash scripts/postgres.sh up DIR [PORT] | down DIR | install" >&2
  exit 2
}

random_hex() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }

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
      die "no PostgreSQL server binaries (initdb); run: bash scripts/postgres.sh install"
    fi
    given="$2"
    # pg_ctl puts the data and log paths in double quotes inside a shell command line: these
    # characters would be interpreted there, whatever this script quotes.
    case "$given" in *[\"\$\`\\\']* | *$'\n'*) die "DIR '$given' holds a quote, \$, \` or \\; choose a plainer path" ;; esac
    root=0; [ "$(id -u)" -eq 0 ] && root=1
    if [ -L "$given" ]; then die "DIR $given is a symbolic link; give a new folder"; fi
    if [ -e "$given" ]; then
      [ -d "$given" ] || die "DIR $given exists and is not a folder; give a new folder"
      [ -z "$(ls -A -- "$given")" ] || die "DIR $given exists and is not empty; give a new folder (nothing in it was changed)"
      [ "$(stat -c %u -- "$given")" = "$(id -u)" ] || die "DIR $given belongs to another user; give a new folder"
    else
      mkdir -p -m "$([ "$root" -eq 1 ] && echo 711 || echo 700)" -- "$given"
    fi
    dir="$(cd -- "$given" && pwd -P)"
    if [ "$root" -eq 1 ] && ! runuser -u postgres -- test -x "$dir"; then
      die "the server's user postgres cannot enter $dir (as root the server runs as postgres); give a folder it can reach, e.g. under /tmp"
    fi
    port="${3:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
    case "$port" in ''|*[!0-9]*) die "PORT must be a number, got '$port'" ;; esac

    # The role's password, in files only the caller reads (never on a command line).
    password="$(random_hex)"
    (umask 077
     printf '%s\n' "$password" >"$dir/password"
     printf '127.0.0.1:%s:*:optuna:%s\n' "$port" "$password" >"$dir/pgpass")
    server="$dir/server"
    mkdir -m 700 -- "$server"
    if [ "$root" -eq 1 ]; then chown postgres: -- "$server"; fi
    as_server mkdir -m 700 -- "$server/socket"
    # initdb wants a superuser password with password authentication: a random one, thrown away
    # (the superuser logs in over the private socket only, as the server's OS user).
    as_server bash -c 'umask 077; od -An -N24 -tx1 /dev/urandom | tr -d " \n" >"$1"' _ "$server/superuser.pw"
    as_server "$bin/initdb" -D "$server/data" --auth-local=peer --auth-host=scram-sha-256 \
      --pwfile="$server/superuser.pw" -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
      || { as_server rm -f -- "$server/superuser.pw"; die "initdb failed; see $dir/initdb.log"; }
    as_server rm -f -- "$server/superuser.pw"
    # Settings in postgresql.conf, not on pg_ctl's -o line (which a shell reads): a path there
    # needs only its single quotes doubled.
    conf_socket="${server//\'/\'\'}/socket"
    as_server bash -c 'cat >>"$1"' _ "$server/data/postgresql.conf" <<EOF
# scripts/postgres.sh: 127.0.0.1 only, the socket in a folder of the server's user only.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$conf_socket'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
EOF
    as_server "$bin/pg_ctl" -D "$server/data" -l "$server/server.log" -w -t 60 ${PG_OPTS:+-o "$PG_OPTS"} start \
      >/dev/null || die "the server did not start; see $server/server.log"
    # The role and its database, by the superuser over the socket; the SQL (with the password)
    # on psql's standard input.
    as_server "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h "$server/socket" -p "$port" -d postgres >/dev/null <<EOF \
      || die "could not create the role and database; see $server/server.log"
CREATE ROLE optuna LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD '$password';
CREATE DATABASE optuna OWNER optuna;
REVOKE CONNECT ON DATABASE postgres, template1 FROM PUBLIC;
EOF
    passfile="$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1]))' "$dir/pgpass")"
    echo "postgresql://optuna@127.0.0.1:$port/optuna?passfile=$passfile"
    ;;
  down)
    [ $# -ge 2 ] || usage
    bin="$(bindir)" || die "no PostgreSQL server binaries (pg_ctl)"
    [ -d "$2/server/data" ] || die "no server made by 'up' in $2"
    # pg_ctl stops the postmaster whose pid is in DIR/server/data/postmaster.pid: this server only.
    as_server "$bin/pg_ctl" -D "$2/server/data" -m fast -w stop >/dev/null
    ;;
  *)
    usage
    ;;
esac
