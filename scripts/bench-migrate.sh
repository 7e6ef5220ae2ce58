#!/usr/bin/env bash
# usage: scripts/bench-migrate.sh [MIB] [ROUNDS]   (defaults: 512 3)
# The migration figures of docs/BENCHMARKS.md ("Migration"): two S3 protocol servers
# (elea-s3-test-server, s3s-fs over a directory each), one metadata node, one cache node
# (R=1) and a volume holding MIB MiB (4 MiB blocks, no compression) in the first server.
# Each round, in alternating order:
#  - migrate: `elea migrate --wait --json` moves the volume's objects to a new prefix on the
#    other server (MiB/s = bytes copied / the job's own time, from its record);
#  - copy: `elea bench store --copy-to` puts MIB MiB of 4 MiB objects in the server the
#    volume is in now and copies them to the other one with plain opendal GETs and PUTs, 8 in
#    flight (what the migration's copier keeps in flight): the baseline.
# Prints one JSON object per measurement and a summary line with the median ratio.
# ELEA_BIN / S3_BIN = paths use those binaries instead of release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}; ROUNDS=${2:-3}
if [ -z "${ELEA_BIN:-}" ] || [ -z "${S3_BIN:-}" ]; then
  cargo build --release --locked -p elea -p elea-integration --bin elea --bin elea-s3-test-server >/dev/null
fi
B=${ELEA_BIN:-$PWD/target/release/elea}; S3=${S3_BIN:-$PWD/target/release/elea-s3-test-server}
WORK=$(mktemp -d /var/tmp/elea-migrate.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=elea-test AWS_SECRET_ACCESS_KEY=elea-test-secret
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; tail -n 5 "$WORK"/*.log >&2; exit 1; }

P1=$(free_port); P2=$(free_port); PM=$(free_port); PC=$(free_port)
mkdir -p "$WORK/s3a" "$WORK/s3b"
"$S3" --root "$WORK/s3a" --port "$P1" >"$WORK/s3a.log" 2>&1 & PIDS+=($!)
"$S3" --root "$WORK/s3b" --port "$P2" >"$WORK/s3b.log" 2>&1 & PIDS+=($!)
url() { echo "s3://elea/$2?endpoint=http://127.0.0.1:$1&region=us-east-1"; }
META=127.0.0.1:$PM
"$B" meta --node-id 1 --listen "$META" --data-dir "$WORK/meta" --initial-cluster "1=$META" >"$WORK/meta.log" 2>&1 & PIDS+=($!)
"$B" cache --node-id 1 --site local --listen "127.0.0.1:$PC" --data-dir "$WORK/cache" --meta "$META" --staging-size 4G \
  >"$WORK/cache.log" 2>&1 & PIDS+=($!)
wait_port "$P1"; wait_port "$P2"; wait_port "$PM"; wait_port "$PC"
for _ in $(seq 1 100); do "$B" status --meta "$META" --json 2>/dev/null | grep -q '"alive":true' && break; sleep 0.2; done
"$B" volume create v --meta "$META" --store "$(url "$P1" v0)" --replicas 1 --tier-after 1s --compression none >/dev/null
"$B" bench data --meta "$META" --volume v --size "${MIB}M" --threads 4 --no-cold --keep --json >"$WORK/write.json"
"$B" tier --meta "$META" --volume v --wait >/dev/null

on=1; n=0
M=(); C=()
migrate() { # moves the volume to a new prefix on the other server; its figures to $WORK/last
  n=$((n + 1))
  local port; if [ "$on" = 1 ]; then port=$P2; on=2; else port=$P1; on=1; fi
  "$B" migrate v --to "$(url "$port" "v$n")" --wait --json --meta "$META" >"$WORK/m$n.json"
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"what": "migrate", "objects": d["objects_done"], "bytes": d["bytes_done"],
                  "seconds": round(d["elapsed_secs"], 2),
                  "mib_per_s": round(d["bytes_done"] / 2**20 / d["elapsed_secs"], 1)}))' "$WORK/m$n.json" >"$WORK/last"
  cat "$WORK/last"
  M+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mib_per_s"])' "$WORK/last")")
}
copy() { # the plain GET+PUT loop from the server the volume is in to the other one
  local from to; if [ "$on" = 1 ]; then from=$P1; to=$P2; else from=$P2; to=$P1; fi
  "$B" bench store --store "$(url "$from" base)" --copy-to "$(url "$to" base)" --size "${MIB}M" --threads 8 --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"what":"copy","mib_per_s":round(d["copy_mib_per_s"],1)}))' \
    >"$WORK/last"
  cat "$WORK/last"
  C+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mib_per_s"])' "$WORK/last")")
}
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then migrate; copy; else copy; migrate; fi
done
python3 -c '
import json, statistics, sys
m = [float(x) for x in sys.argv[1].split()]; c = [float(x) for x in sys.argv[2].split()]
ratios = [a / b for a, b in zip(m, c)]
print(json.dumps({"what": "summary", "migrate_mib_per_s": m, "copy_mib_per_s": c,
                  "ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3)}))' "${M[*]}" "${C[*]}"
