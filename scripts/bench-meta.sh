#!/usr/bin/env bash
# usage: scripts/bench-meta.sh VOTERS THREADS FILES [extra `elea bench meta` flags]
# Starts VOTERS `elea meta` processes on loopback (release build, fresh temporary data dirs),
# runs `elea bench meta` against them, and stops them. Prints the benchmark's table.
# ELEA_BIN=PATH uses that binary instead of building one (to compare two builds in one run).
set -euo pipefail
cd "$(dirname "$0")/.."
VOTERS=${1:?$(sed -n 2p "$0")}; THREADS=${2:?}; FILES=${3:?}; shift 3
if [ -n "${ELEA_BIN:-}" ]; then
  B=$ELEA_BIN
else
  cargo build --release --locked -p elea >/dev/null
  B=./target/release/elea
fi
DIR=$(mktemp -d)
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
IC=""; ADDRS=""
for i in $(seq 1 "$VOTERS"); do
  a="127.0.0.1:$(port)"; IC="$IC${IC:+,}$i=$a"; ADDRS="$ADDRS${ADDRS:+,}$a"
done
i=0
for a in ${ADDRS//,/ }; do
  i=$((i+1))
  RUST_LOG=warn "$B" meta --node-id "$i" --listen "$a" --data-dir "$DIR/n$i" --initial-cluster "$IC" \
    >"$DIR/n$i.log" 2>&1 &
  PIDS+=($!)
done
for _ in $(seq 1 100); do "$B" status --meta "$ADDRS" --json 2>/dev/null | grep -q '"leader_id":[1-9]' && break; sleep 0.1; done
echo "# $VOTERS voter(s) on loopback, $THREADS threads, $FILES ops per phase"
"$B" bench meta --meta "$ADDRS" --threads "$THREADS" --files "$FILES" "$@"
