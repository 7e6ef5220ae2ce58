#!/usr/bin/env bash
# usage: scripts/bench-tls.sh [SIZE] [PAIRS] [R]     (defaults: 512M 5 2)
# What mutual TLS costs the block service: two stacks side by side on loopback, each one
# `elea meta` and two `elea cache` nodes with a volume of R copies, one plaintext and one
# whose cache nodes and client use certificates (`elea certs`). `elea bench data --no-cold`
# (writes in 4 MiB calls, then a hot read, every byte checked) runs PAIRS times on each,
# alternating which goes first. Prints one JSON line per run and the per-pair ratios
# TLS / plaintext. Release build; work files under $BENCH_DIR (default /var/tmp).
set -euo pipefail
SIZE=${1:-512M}
PAIRS=${2:-5}
R=${3:-2}
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p elea
B=$PWD/target/release/elea
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/elea-bench-tls.XXXXXX")
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$B" certs init --dir "$WORK/ca" >/dev/null
for i in 1 2; do "$B" certs issue --dir "$WORK/ca" --role cache --name "cache$i" --out "$WORK/cache$i" >/dev/null; done
"$B" certs issue --dir "$WORK/ca" --role gateway --name bench --volume v --out "$WORK/gw" >/dev/null

# stack NAME [TLS]: a metadata node, two cache nodes and volume v; prints the metadata address.
stack() {
  local name=$1 tls=${2:-} mp d=$WORK/$1
  mp=$(port)
  "$B" meta --node-id 1 --listen "127.0.0.1:$mp" --data-dir "$d/meta" --initial-cluster "1=127.0.0.1:$mp" \
    >"$d.meta.log" 2>&1 &
  PIDS+=($!)
  wait_port "$mp"
  for i in 1 2; do
    local cp certs=()
    cp=$(port)
    [ -n "$tls" ] && certs=(--ca "$WORK/ca/ca.pem" --cert "$WORK/cache$i.pem" --key "$WORK/cache$i.key")
    "$B" cache --node-id "$i" --site local --listen "127.0.0.1:$cp" --data-dir "$d/cache$i" \
      --meta "127.0.0.1:$mp" --staging-size 16G "${certs[@]}" >"$d.cache$i.log" 2>&1 &
    PIDS+=($!)
    wait_port "$cp"
  done
  for _ in $(seq 1 100); do
    "$B" volume create v --meta "127.0.0.1:$mp" --store "file://$d/objects" --shared-file-store --replicas "$R" >/dev/null 2>&1 && break
    sleep 0.2
  done
  echo "127.0.0.1:$mp"
}
PLAIN=$(stack plain)
TLS=$(stack tls yes)
sleep 3

run() {
  local mode=$1 meta certs=()
  if [ "$mode" = tls ]; then
    meta=$TLS
    certs=(--ca "$WORK/ca/ca.pem" --cert "$WORK/gw.pem" --key "$WORK/gw.key")
  else
    meta=$PLAIN
  fi
  "$B" bench data --meta "$meta" --volume v --size "$SIZE" --no-cold --json "${certs[@]}" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"mode": sys.argv[1], **{p["phase"]: round(p["mib_per_s"], 1) for p in d["phases"]}}))' "$mode"
}
OUT=$WORK/runs.jsonl
for i in $(seq 1 "$PAIRS"); do
  if [ $((i % 2)) = 1 ]; then run plain; run tls; else run tls; run plain; fi
done | tee "$OUT"
python3 - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
plain = [r for r in runs if r["mode"] == "plain"]
tls = [r for r in runs if r["mode"] == "tls"]
for phase in [k for k in runs[0] if k != "mode"]:
    ratios = [t[phase] / p[phase] for p, t in zip(plain, tls)]
    print(f"{phase}: TLS/plaintext per pair {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}")
PY
