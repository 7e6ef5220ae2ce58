#!/usr/bin/env bash
# usage: scripts/bench-tls-meta.sh [FILES] [PAIRS] [THREADS]     (defaults: 10000 5 16)
# What mutual TLS costs the metadata service: two clusters of three `elea meta` voters side by
# side on loopback, one plaintext and one with certificates on every connection (clients, Raft
# peer links, snapshots). `elea bench meta` (mkdir, create, stat, rename, unlink; FILES
# operations per phase, THREADS workers, a new volume per run) runs PAIRS times on each,
# alternating which goes first. Prints one JSON line per run and the per-pair ratios
# TLS / plaintext of each phase's operations per second. Release build; work files under
# $BENCH_DIR (default /var/tmp).
set -euo pipefail
FILES=${1:-10000}
PAIRS=${2:-5}
THREADS=${3:-16}
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p elea
B=$PWD/target/release/elea
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/elea-bench-tls-meta.XXXXXX")
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

"$B" certs init --dir "$WORK/ca" >/dev/null
for i in 1 2 3; do "$B" certs issue --dir "$WORK/ca" --role meta --name "$i" --out "$WORK/meta$i" >/dev/null; done
"$B" certs issue --dir "$WORK/ca" --role admin --name bench --out "$WORK/admin" >/dev/null

# cluster NAME [TLS]: three voters; prints their addresses.
cluster() {
  local name=$1 tls=${2:-} d=$WORK/$1 ports=() ic="" addrs=""
  for i in 1 2 3; do ports+=("$(port)"); done
  for i in 1 2 3; do
    ic+="${ic:+,}$i=127.0.0.1:${ports[$((i - 1))]}"
    addrs+="${addrs:+,}127.0.0.1:${ports[$((i - 1))]}"
  done
  for i in 1 2 3; do
    local certs=()
    [ -n "$tls" ] && certs=(--ca "$WORK/ca/ca.pem" --cert "$WORK/meta$i.pem" --key "$WORK/meta$i.key")
    "$B" meta --node-id "$i" --listen "127.0.0.1:${ports[$((i - 1))]}" --data-dir "$d/m$i" \
      --initial-cluster "$ic" "${certs[@]}" >"$d.m$i.log" 2>&1 &
    PIDS+=($!)
  done
  for p in "${ports[@]}"; do wait_port "$p"; done
  echo "$addrs"
}
PLAIN=$(cluster plain)
TLS=$(cluster tls yes)
sleep 3

run() {
  local mode=$1 meta certs=()
  if [ "$mode" = tls ]; then
    meta=$TLS
    certs=(--ca "$WORK/ca/ca.pem" --cert "$WORK/admin.pem" --key "$WORK/admin.key")
  else
    meta=$PLAIN
  fi
  "$B" bench meta --meta "$meta" --threads "$THREADS" --files "$FILES" --json "${certs[@]}" |
    python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"mode": sys.argv[1], **{p["phase"]: round(p["ops"] / p["seconds"]) for p in d["phases"]}}))' "$mode"
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
