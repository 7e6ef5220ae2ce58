#!/usr/bin/env bash
# usage: scripts/bench-pg.sh DIR [SCALE] [CLIENTS] [SECONDS]     (defaults: 20 4 30)
# PostgreSQL's pgbench on a directory (an Elea mount, a local directory, any other mount): a
# database cluster in DIR/elea-pgbench, `pgbench -i -s SCALE`, then `pgbench -c CLIENTS
# -j min(CLIENTS,2) -T SECONDS` (TPC-B-like: every transaction commits with a WAL fsync).
# Prints one JSON line: TPS and per-transaction latency (average, p50, p90, p99, in ms, from
# pgbench's transaction log). Installs PostgreSQL from Debian's packages when it is missing.
# Runs as root (the server runs as the `postgres` user, which must be able to write DIR);
# removes its database cluster afterwards.
set -euo pipefail
DIR=${1:?usage: scripts/bench-pg.sh DIR [SCALE] [CLIENTS] [SECONDS]}
SCALE=${2:-20}
CLIENTS=${3:-4}
SECONDS_=${4:-30}
JOBS=$((CLIENTS < 2 ? CLIENTS : 2))

BIN=$("$(dirname "$0")/ensure-postgres.sh")

DATA=$DIR/elea-pgbench
SOCK=$(mktemp -d /tmp/elea-pgbench-sock.XXXXXX)
LOGS=$(mktemp -d /tmp/elea-pgbench-log.XXXXXX)
chown postgres "$SOCK" "$LOGS"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg() { runuser -u postgres -- "$@"; }
cleanup() {
  as_pg "$BIN/pg_ctl" -D "$DATA" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$DATA" "$SOCK" "$LOGS"
}
trap cleanup EXIT
rm -rf "$DATA"
mkdir -p "$DATA"
chown postgres "$DATA"
chmod 700 "$DATA"
as_pg "$BIN/initdb" -D "$DATA" -A trust -U postgres >/dev/null
as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOGS/server.log" -w -t 120 \
  -o "-p $PORT -k $SOCK -c listen_addresses='' -c fsync=on -c synchronous_commit=on" start >/dev/null
as_pg "$BIN/pgbench" -h "$SOCK" -p "$PORT" -i -s "$SCALE" -q postgres >/dev/null 2>&1
(cd "$LOGS" && as_pg "$BIN/pgbench" -h "$SOCK" -p "$PORT" -c "$CLIENTS" -j "$JOBS" -T "$SECONDS_" \
  -l --log-prefix="$LOGS/tx" postgres) >"$LOGS/out.txt" 2>&1 || { cat "$LOGS/out.txt" >&2; exit 1; }
python3 - "$LOGS" "$DIR" "$SCALE" "$CLIENTS" "$SECONDS_" <<'PY'
import glob, json, re, statistics, sys
logs, d, scale, clients, secs = sys.argv[1:]
out = open(logs + "/out.txt").read()
tps = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out)
failed = re.search(r"number of failed transactions: (\d+)", out)
lat = []
for f in glob.glob(logs + "/tx*"):
    for line in open(f):
        parts = line.split()
        if len(parts) >= 3:
            lat.append(int(parts[2]) / 1000.0)
lat.sort()
pct = lambda p: round(lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
print(json.dumps({
    "benchmark": "pgbench", "dir": d, "scale": int(scale), "clients": int(clients), "seconds": int(secs),
    "tps": float(tps.group(1)) if tps else None,
    "transactions": len(lat),
    "failed": int(failed.group(1)) if failed else 0,
    "latency_ms": {"avg": round(statistics.mean(lat), 3) if lat else None,
                   "p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99)},
}))
if not tps:
    sys.exit("pgbench printed no TPS:\n" + out)
PY
