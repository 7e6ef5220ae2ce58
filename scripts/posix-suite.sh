#!/usr/bin/env bash
# POSIX conformance of an `elea up` mount: starts `elea up` on a temporary data directory and
# mount point, runs scripts/pjdfstest.sh inside the mount (failures are compared with
# tests/pjdfstest-known-failures.txt), then stops `elea up` with SIGTERM, which must unmount
# and exit cleanly.
#
#   scripts/posix-suite.sh   (ELEA_BIN: the elea binary, default debug/elea under
#                             $CARGO_TARGET_DIR, or under target/ when that is not set)
#
# Needs root and /dev/fuse. Without them it prints SKIPPED and exits 0 having run nothing,
# unless ELEA_REQUIRE_FUSE=1 (set by scripts/test.sh, and so in CI), which makes that a
# failure.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
elea=${ELEA_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/elea}

why=""
[ "$(id -u)" -eq 0 ] || why="not running as root"
[ -e /dev/fuse ] || why="/dev/fuse is missing"
if [ -n "$why" ]; then
  if [ "${ELEA_REQUIRE_FUSE:-0}" = 1 ]; then echo "posix-suite: FAILED: $why" >&2; exit 1; fi
  echo "posix-suite: SKIPPED (pjdfstest on an elea up mount needs root and /dev/fuse: $why)"
  exit 0
fi
[ -x "$elea" ] || { echo "posix-suite: no elea binary at $elea (cargo build -p elea)" >&2; exit 1; }

tmp=$(mktemp -d /tmp/elea-posix.XXXXXX)
chmod 755 "$tmp"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
  mountpoint -q "$tmp/mnt" 2>/dev/null && umount -l "$tmp/mnt"
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {  # a port nothing listens on
  local p
  while :; do
    p=$((20000 + RANDOM % 40000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
}
meta_port=$(free_port); cache_port=$(free_port)
mkdir -p "$tmp/mnt"
"$elea" up --data-dir "$tmp/data" --listen "127.0.0.1:$meta_port" --cache-listen "127.0.0.1:$cache_port" \
  --staging-size 1G "$tmp/mnt" > "$tmp/up.log" 2>&1 < /dev/null &
pid=$!
for _ in $(seq 1 300); do
  mountpoint -q "$tmp/mnt" && break
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.1
done
if ! mountpoint -q "$tmp/mnt"; then
  echo "posix-suite: elea up did not mount; its log:" >&2
  tail -n 40 "$tmp/up.log" >&2
  exit 1
fi

rc=0
"$repo/scripts/pjdfstest.sh" "$tmp/mnt" "$tmp/pjdfstest" || rc=$?
if [ $rc -ne 0 ]; then
  echo "posix-suite: pjdfstest failed; failures:" >&2
  cat "$tmp/pjdfstest/new-failures.txt" >&2 2>/dev/null || true
fi

kill -TERM "$pid"
status=0
wait "$pid" || status=$?
pid=""
if [ $status -ne 0 ]; then
  echo "posix-suite: elea up exited with status $status after SIGTERM; its log:" >&2
  tail -n 40 "$tmp/up.log" >&2
  exit 1
fi
if mountpoint -q "$tmp/mnt"; then
  echo "posix-suite: the mount is still there after elea up stopped" >&2
  exit 1
fi
exit $rc
