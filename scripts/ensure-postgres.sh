#!/usr/bin/env bash
# usage: scripts/ensure-postgres.sh
# Prints the directory of PostgreSQL's server binaries (initdb, pg_ctl, postgres, psql,
# pgbench), installing PostgreSQL from Debian's packages first when it is missing (as root).
# The default cluster the package may start is stopped: callers run their own.
set -euo pipefail
pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
if [ -z "$(pgbin)" ] || [ ! -x "$(pgbin)/pgbench" ]; then
  echo "installing PostgreSQL from Debian's packages" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  pg_lsclusters -h 2>/dev/null | while read -r version name _; do
    pg_ctlcluster "$version" "$name" stop >/dev/null 2>&1 || true
  done
fi
id postgres >/dev/null 2>&1 || { echo "no postgres user after installing PostgreSQL" >&2; exit 1; }
pgbin
