#!/usr/bin/env bash
# usage: scripts/cluster-run.sh [--tls] COMMAND [ARGS...]     [ELEA_BIN=path, default target/release/elea]
# Runs COMMAND against a local multi-process cluster and tears it down afterwards: three
# `elea meta` voters, two `elea cache` nodes of site "local", a volume `v` with R=2 whose store
# is a directory both nodes see, and its FUSE mount. COMMAND runs with ELEA_MNT set to the
# mount point and ELEA_META to the voters' addresses (and, with --tls, every process uses
# certificates and ELEA_CA, ELEA_CERT, ELEA_KEY name an admin's), e.g.
#   scripts/cluster-run.sh sh -c 'scripts/bench-pg.sh "$ELEA_MNT"'
# Needs root and /dev/fuse. Work files under $BENCH_DIR (default /var/tmp), removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
TLS=
if [ "${1:-}" = --tls ]; then TLS=1; shift; fi
[ $# -gt 0 ] || { sed -n 2,9p "$0"; exit 2; }
B=${ELEA_BIN:-$PWD/target/release/elea}
[ -x "$B" ] || { echo "no elea binary at $B (cargo build --release, or set ELEA_BIN)" >&2; exit 1; }
WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/elea-cluster.XXXXXX")
chmod 755 "$WORK"
PIDS=()
MNT=$WORK/mnt
cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && { fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; }
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }
certs() { [ -n "$TLS" ] && echo --ca "$WORK/ca/ca.pem" --cert "$WORK/$1.pem" --key "$WORK/$1.key"; true; }
if [ -n "$TLS" ]; then
  "$B" certs init --dir "$WORK/ca" >/dev/null
  for i in 1 2 3; do "$B" certs issue --dir "$WORK/ca" --role meta --name "$i" --out "$WORK/meta$i" >/dev/null; done
  for i in 1 2; do "$B" certs issue --dir "$WORK/ca" --role cache --name "cache$i" --out "$WORK/cache$i" >/dev/null; done
  "$B" certs issue --dir "$WORK/ca" --role admin --name ops --out "$WORK/admin" >/dev/null
  "$B" certs issue --dir "$WORK/ca" --role gateway --name host --volume v --out "$WORK/gw" >/dev/null
  export ELEA_CA=$WORK/ca/ca.pem ELEA_CERT=$WORK/admin.pem ELEA_KEY=$WORK/admin.key
fi
MP=(); for i in 1 2 3; do MP+=("$(port)"); done
IC=1=127.0.0.1:${MP[0]},2=127.0.0.1:${MP[1]},3=127.0.0.1:${MP[2]}
export ELEA_META=127.0.0.1:${MP[0]},127.0.0.1:${MP[1]},127.0.0.1:${MP[2]}
for i in 1 2 3; do
  # shellcheck disable=SC2046
  "$B" meta --node-id "$i" --listen "127.0.0.1:${MP[$((i - 1))]}" --data-dir "$WORK/m$i" --initial-cluster "$IC" \
    $(certs "meta$i") >"$WORK/m$i.log" 2>&1 &
  PIDS+=($!)
done
for p in "${MP[@]}"; do wait_port "$p"; done
for i in 1 2; do
  cp=$(port)
  # shellcheck disable=SC2046
  "$B" cache --node-id "$i" --site local --listen "127.0.0.1:$cp" --data-dir "$WORK/c$i" --meta "$ELEA_META" \
    --staging-size 16G $(certs "cache$i") >"$WORK/c$i.log" 2>&1 &
  PIDS+=($!)
  wait_port "$cp"
done
mkdir -p "$WORK/objects" "$MNT"
for _ in $(seq 1 150); do
  "$B" volume create v --store "file://$WORK/objects" --shared-file-store --replicas 2 >/dev/null 2>&1 && break
  sleep 0.2
done
for _ in $(seq 1 150); do
  [ "$("$B" status --json 2>/dev/null | python3 -c 'import json,sys; print(sum(n["alive"] for n in json.load(sys.stdin)["cache_nodes"]))' 2>/dev/null)" = 2 ] && break
  sleep 0.2
done
(
  if [ -n "$TLS" ]; then export ELEA_CERT=$WORK/gw.pem ELEA_KEY=$WORK/gw.key; fi
  exec "$B" mount --volume v "$MNT" >"$WORK/mount.log" 2>&1
) &
PIDS+=($!)
for _ in $(seq 1 150); do mountpoint -q "$MNT" && break; sleep 0.2; done
mountpoint -q "$MNT" || { tail "$WORK/mount.log" >&2; exit 1; }
chmod 777 "$MNT"
ELEA_MNT=$MNT "$@"
