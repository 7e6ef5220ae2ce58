#!/usr/bin/env bash
# Runs the pjdfstest POSIX conformance suite on a directory of the file system under
# test (normally inside an `elea up` mount) and compares the failures with
# tests/pjdfstest-known-failures.txt.
#
#   scripts/pjdfstest.sh DIR [OUTDIR]
#
# Must run as root (the suite chowns files and switches to the dummy users nobody and
# tests; `tests` is created when missing). pjdfstest is installed into target/tools on
# first use. The log, the config and the parsed results go to OUTDIR (default: a new
# temporary directory). Environment: PJDFSTEST_TIMEOUT (seconds, default 1800),
# PJDFSTEST_SECONDARY_FS (an empty directory on another file system, for the EXDEV
# tests; default: a new directory under /dev/shm, /tmp or /var/tmp).
#
# Exit status: 0 when every failure is listed in the known-failures file, 1 on new
# failures, a timeout or an unreadable run, 2 on bad usage (not root, no DIR).
set -euo pipefail
export LC_ALL=C

PJDFSTEST_VERSION=0.2.2
repo=$(cd "$(dirname "$0")/.." && pwd)
known=$repo/tests/pjdfstest-known-failures.txt
bin=$repo/target/tools/bin/pjdfstest

die() { echo "pjdfstest.sh: $*" >&2; exit 2; }
[ $# -eq 1 ] || [ $# -eq 2 ] || die "usage: scripts/pjdfstest.sh DIR [OUTDIR]"
[ "$(id -u)" -eq 0 ] || die "must run as root (the suite changes owners and switches users)"
[ -d "$1" ] || die "$1: no such directory"
dir=$(cd "$1" && pwd)

if ! "$bin" --version 2>/dev/null | grep -qx "pjdfstest $PJDFSTEST_VERSION"; then
  command -v cargo >/dev/null || die "cargo not found (needed to install pjdfstest)"
  echo "== installing pjdfstest $PJDFSTEST_VERSION into target/tools"
  CARGO_TARGET_DIR=$repo/target/tools-build \
    cargo install --locked --root "$repo/target/tools" --version "$PJDFSTEST_VERSION" pjdfstest
fi

# Dummy users: each entry is a user and its primary group (pjdfstest checks that).
id -u tests >/dev/null 2>&1 || useradd -M -U -d / -s /usr/sbin/nologin tests

out=${2:-$(mktemp -d "${TMPDIR:-/tmp}/pjdfstest-out.XXXXXX")}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log=$out/pjdfstest.log
cfg=$out/pjdfstest.toml

# The EXDEV tests need a directory on a different file system than DIR.
dev=$(stat -c %d "$dir")
sec_parent=${PJDFSTEST_SECONDARY_FS:-}
if [ -z "$sec_parent" ]; then
  for d in /dev/shm /tmp /var/tmp; do
    if [ -d "$d" ] && [ "$(stat -c %d "$d")" != "$dev" ]; then sec_parent=$d; break; fi
  done
fi
work=$(mktemp -d "$dir/pjdfstest.XXXXXX")
sec='' sec_line=''
trap 'rm -rf "$work" ${sec:+"$sec"}' EXIT
chmod 755 "$work"
if [ -n "$sec_parent" ]; then
  sec=$(mktemp -d "$sec_parent/pjdfstest-secondary.XXXXXX")
  chmod 755 "$sec"
  sec_line="secondary_fs = \"$sec\""
fi

cat >"$cfg" <<EOF
[features]
posix_fallocate = {}
utime_now = {}
utimensat = {}
rename_ctime = {}
$sec_line

[settings]
naptime = 0.01
allow_remount = false

[dummy_auth]
entries = [["nobody", "$(id -gn nobody)"], ["tests", "$(id -gn tests)"]]
EOF

timeout_secs=${PJDFSTEST_TIMEOUT:-1800}
echo "== pjdfstest $PJDFSTEST_VERSION on $dir ($(df --output=fstype "$dir" | tail -n 1)), log: $log"
start=$(date +%s)
rc=0
(cd "$work" && NO_COLOR=1 timeout -k 30 "$timeout_secs" "$bin" -c "$cfg" -p "$work") 2>&1 |
  sed 's/\x1b\[[0-9;]*m//g' >"$log" || rc=$?
echo "== finished in $(($(date +%s) - start))s (exit status $rc)"

# Result lines: "<name><spaces><status>"; indented lines below them are details.
sed -nE 's/^([^[:space:]]+)[[:space:]]+(ok|FAILED|skipped|failed as expected|PASSED UNEXPECTEDLY)$/\1 \2/p' \
  "$log" | sort >"$out/results.txt"
names() { grep -E " ($1)\$" "$out/results.txt" | cut -d' ' -f1 || true; }
names 'FAILED|PASSED UNEXPECTEDLY' >"$out/failed.txt"
names ok >"$out/passed.txt"
echo "pjdfstest: $(wc -l <"$out/passed.txt") passed, $(wc -l <"$out/failed.txt") failed," \
  "$(names skipped | wc -l) skipped"

status=0
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "FAIL: pjdfstest timed out after ${timeout_secs}s (PJDFSTEST_TIMEOUT)"
  status=1
elif ! grep -q '^Summary: ' "$log"; then
  echo "FAIL: pjdfstest printed no summary; last lines of the log:"
  tail -n 20 "$log"
  status=1
elif [ "$(sed -n 's/^Summary: .* \([0-9]*\) total$/\1/p' "$log")" != "$(wc -l <"$out/results.txt")" ]; then
  echo "FAIL: the summary's total does not match the result lines read from the log"
  status=1
elif [ "$rc" -ne 0 ] && [ ! -s "$out/failed.txt" ]; then
  echo "FAIL: pjdfstest exited with status $rc without a failed test"
  status=1
fi

# Known failures: "<test name> # <reason>" per line; '#' lines and blank lines ignored.
sed -E -e 's/^[[:space:]]*#.*//' -e 's/[[:space:]]+#.*//' -e 's/[[:space:]]+$//' \
  -e 's/^[[:space:]]+//' "$known" | grep -v '^$' | sort -u >"$out/known.txt" || true
comm -23 "$out/failed.txt" "$out/known.txt" >"$out/new-failures.txt"
comm -12 "$out/passed.txt" "$out/known.txt" >"$out/fixed.txt"
if [ -s "$out/fixed.txt" ]; then
  echo "fixed: remove from the known-failures file ($known):"
  sed 's/^/  /' "$out/fixed.txt"
fi
if [ -s "$out/new-failures.txt" ]; then
  echo "new failures (details in $log):"
  sed 's/^/  /' "$out/new-failures.txt"
  status=1
fi
[ "$status" -eq 0 ] && echo "OK: no failure outside the known-failures file"
exit "$status"
