#!/usr/bin/env bash
# usage: scripts/bench-data.sh [SIZE] [THREADS]      (defaults: 1G 4)
# The data path benchmark and its baselines, in one run on one disk:
#   - `elea bench data` with R=1 and R=2 (one metadata node, two cache nodes on loopback, an
#     S3 protocol server as the object store);
#   - fio on the same disk: sequential 4 MiB writes with an fsync after each, and reads;
#   - `elea bench store`: plain opendal GETs of 4 MiB objects from the same S3 server.
# Work files live under $BENCH_DIR (default /var/tmp); everything started is stopped.
set -euo pipefail
SIZE=${1:-1G}
THREADS=${2:-4}
cd "$(dirname "$0")/.."
cargo build --release --bins -q
BIN=$PWD/target/release
if ! command -v fio >/dev/null; then
  echo "installing fio" >&2
  (apt-get install -y -q fio >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q fio >/dev/null; })
fi
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/elea-bench-data.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

S3P=$(port); MP=$(port); C1=$(port); C2=$(port)
"$BIN/elea-s3-test-server" --root "$WORK/s3" --bucket elea --port "$S3P" > "$WORK/s3.log" 2>&1 & PIDS+=($!)
wait_port "$S3P"
export AWS_ACCESS_KEY_ID=elea-test AWS_SECRET_ACCESS_KEY=elea-test-secret
S3="s3://elea/PREFIX?endpoint=http://127.0.0.1:$S3P&region=us-east-1"
export ELEA_META=127.0.0.1:$MP
"$BIN/elea" meta --node-id 1 --listen "$ELEA_META" --data-dir "$WORK/meta" --initial-cluster "1=$ELEA_META" > "$WORK/meta.log" 2>&1 & PIDS+=($!)
wait_port "$MP"
for i in 1 2; do
  P=$([ $i = 1 ] && echo "$C1" || echo "$C2")
  "$BIN/elea" cache --node-id $i --site local --listen "127.0.0.1:$P" --data-dir "$WORK/cache$i" \
    --staging-size 16G --cache-mem 1G > "$WORK/cache$i.log" 2>&1 & PIDS+=($!)
  wait_port "$P"
done
sleep 2
"$BIN/elea" volume create r1 --store "${S3/PREFIX/r1}" --replicas 1 --tier-after 1h >/dev/null
"$BIN/elea" volume create r2 --store "${S3/PREFIX/r2}" --replicas 2 --tier-after 1h >/dev/null

echo "== elea bench data, R=1, $SIZE, $THREADS in flight"
"$BIN/elea" bench data --volume r1 --size "$SIZE" --threads "$THREADS"
echo "== elea bench data, R=2, $SIZE, $THREADS in flight"
"$BIN/elea" bench data --volume r2 --size "$SIZE" --threads "$THREADS"
echo "== elea bench store (plain opendal GET of 4 MiB objects), $SIZE, $THREADS in flight"
"$BIN/elea" bench store --store "${S3/PREFIX/baseline}" --size "$SIZE" --threads "$THREADS"
echo "== fio on the same disk ($WORK), 4 MiB blocks, $THREADS jobs"
BYTES=$(python3 -c "import sys; s='$SIZE'; u={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*u[s[-1].upper()] if s[-1].isalpha() else int(s))")
PER=$((BYTES / THREADS))
for job in "write --fsync=1" "read"; do
  set -- $job
  fio --name=seq-$1 --directory="$WORK" --rw=$1 ${2:-} --bs=4M --size=$PER --numjobs="$THREADS" \
      --ioengine=psync --group_reporting --output-format=terse --terse-version=3 \
    | awk -F';' -v j="$1" '{ if (j=="read") bw=$7; else bw=$48; printf "fio seq-%-6s %9.1f MiB/s\n", j, bw/1024 }'
done
