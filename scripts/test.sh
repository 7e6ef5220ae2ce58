#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property/simulation tests, the
# multi-process cluster and FUSE mount tests, and the POSIX suite pjdfstest on an
# `elea up` mount. This is what CI runs (.ci/run calls it). The FUSE parts need root and
# /dev/fuse; without them they say so and are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

need_cmd() { command -v "$1" >/dev/null 2>&1; }
if ! need_cmd cargo; then
  echo "cargo is required (https://rustup.rs)" >&2
  exit 1
fi
# rustfmt and clippy come with the default rustup profile; add them when missing.
if need_cmd rustup; then
  cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
fi

# The fault scenarios put every process in its own network namespace (iproute2's ip and tc,
# util-linux's nsenter) when running as root; install them when missing.
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 \
  && ! { need_cmd ip && need_cmd tc && need_cmd nsenter; }; then
  echo "== installing iproute2 and util-linux"
  apt-get update -qq && apt-get install -y -qq iproute2 util-linux
fi

echo "== cargo fmt --check"
cargo fmt --all --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (binaries used by the multi-process tests)"
cargo build --workspace --bins --locked
echo "== cargo test"
cargo test --workspace --locked
echo "== POSIX suite (pjdfstest) on an elea up mount"
./scripts/posix-suite.sh
