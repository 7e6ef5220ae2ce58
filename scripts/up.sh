#!/usr/bin/env bash
# Builds Elea (release) and starts the embedded default, `elea up`, in the foreground.
# Extra arguments go to `elea up` (for example --data-dir DIR). Ctrl-C stops it; state stays.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
cargo build --release --locked -p elea
exec ./target/release/elea up "$@"
