#!/usr/bin/env bash
# Builds Elea (release) and starts the embedded default, `elea up`, in the foreground:
# metadata, a cache node, a local object store and the FUSE mount of volume `default`.
#   scripts/up.sh [MOUNTPOINT] [elea up flags]      (default mount point: ./elea-mnt)
# Ctrl-C flushes, unmounts and stops it; state stays in ./elea-data.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
# FUSE: the kernel module's device and, for mounts by non-root users, fusermount3.
if ! command -v fusermount3 >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  echo "== installing fuse3"
  if [ "$(id -u)" -eq 0 ]; then apt-get update -qq && apt-get install -y -qq fuse3
  else sudo apt-get update -qq && sudo apt-get install -y -qq fuse3; fi
fi
cargo build --release --locked -p elea
mnt=./elea-mnt
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then mnt=$1; shift; fi
exec ./target/release/elea up "$@" "$mnt"
