#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit/property/simulation tests, the
# multi-process cluster and FUSE mount tests, the fault scenarios, and the POSIX suite
# pjdfstest on an `elea up` mount. This is what CI runs (.ci/run calls it).
#
# The FUSE mount tests, every fault scenario and pjdfstest need root and /dev/fuse; the
# fault scenarios that cut and slow links also need network namespaces (root, iproute2's
# ip and tc, util-linux's nsenter). Run alone, those tests print SKIPPED and pass having
# checked nothing when these are missing; this script sets ELEA_REQUIRE_FUSE=1 and
# ELEA_REQUIRE_NETNS=1 so that they fail instead. A developer without them can let those
# parts skip explicitly: ELEA_REQUIRE_FUSE=0 ELEA_REQUIRE_NETNS=0 scripts/test.sh
# (.ci/run never does).
set -euo pipefail
cd "$(dirname "$0")/.."

export ELEA_REQUIRE_FUSE="${ELEA_REQUIRE_FUSE:-1}"
export ELEA_REQUIRE_NETNS="${ELEA_REQUIRE_NETNS:-1}"
for v in ELEA_REQUIRE_FUSE ELEA_REQUIRE_NETNS; do
  if [ "${!v}" != 1 ]; then
    echo "== WARNING: $v=${!v}: tests that need what it guards may print SKIPPED and pass having run nothing"
  fi
done

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
# A user's mount (a FUSE test) goes through fusermount3 (package fuse3).
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 && ! need_cmd fusermount3; then
  echo "== installing fuse3"
  apt-get update -qq && apt-get install -y -qq fuse3
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
