#!/usr/bin/env bash
# usage: scripts/bench-volume-move.sh [FILES] [MIB] [RTT] [BANDWIDTH]   (defaults: 100000 1024 20ms 100MiB;
# needs root, iproute2, nsenter and /dev/fuse)
# The volume move figure of docs/BENCHMARKS.md: `elea demo --sites a,b` (release build; per
# site a metadata node, two cache nodes and a file:// store, joined by a WAN link of RTT and
# BANDWIDTH), a volume homed in a with a store in a and one in b, FILES files holding MIB MiB
# in all written through a mount in a (equal sizes, each fsynced at close by the kernel's
# flush) and tiered to a's store; then `elea volume move --to-site b --wait` with the mount
# in a still up. Prints one JSON object: the time the move took, what it copied, and that a
# fresh mount in b sees every file with its size.
# ELEA_BIN=PATH uses that binary instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
FILES=${1:-100000}; MIB=${2:-1024}; RTT=${3:-20ms}; BW=${4:-100MiB}
if [ -n "${ELEA_BIN:-}" ]; then B=$ELEA_BIN; else cargo build --release --locked -p elea >/dev/null; B=$PWD/target/release/elea; fi
WORK=$(mktemp -d /var/tmp/elea-move.XXXXXX)
DEMO=""; MOUNTS=()
cleanup() {
  for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
  [ -n "$DEMO" ] && { kill -TERM "$DEMO" 2>/dev/null; wait "$DEMO" 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT
j() { python3 -c "import json,sys; d=json.load(open('$1')); print(eval(sys.argv[1]))" "$2"; }
"$B" demo --dir "$WORK/demo" --sites a,b --wan-rtt "$RTT" --wan-bandwidth "$BW" --json-out "$WORK/demo.json" \
  >"$WORK/demo.log" 2>&1 &
DEMO=$!
for _ in $(seq 1 600); do [ -f "$WORK/demo.json" ] && break; sleep 0.2; done
[ -f "$WORK/demo.json" ] || { cat "$WORK/demo.log"; exit 1; }
export ELEA_META=$(j "$WORK/demo.json" 'd["meta"]') ELEA_CA=$(j "$WORK/demo.json" 'd["certs"]["ca"]')
export ELEA_CERT=$(j "$WORK/demo.json" 'd["certs"]["cert"]') ELEA_KEY=$(j "$WORK/demo.json" 'd["certs"]["key"]')
in_site() { local ns; ns=$(j "$WORK/demo.json" "d['sites']['$1']['netns']"); shift; nsenter --net=/run/netns/"$ns" "$@"; }
mount_in() { # SITE MOUNTPOINT
  mkdir -p "$2"; in_site "$1" "$B" mount --volume v --site "$1" "$2" >"$2.log" 2>&1 &
  MOUNTS+=("$2")
  for _ in $(seq 1 300); do mountpoint -q "$2" && return; sleep 0.1; done
  cat "$2.log"; exit 1
}
"$B" volume create v --home-site a --store "$(j "$WORK/demo.json" 'd["sites"]["a"]["store"]')" --shared-file-store \
  --tier-after 10s >/dev/null
"$B" volume add-store v --site b "$(j "$WORK/demo.json" 'd["sites"]["b"]["store"]')" >/dev/null
mount_in a "$WORK/ma"
python3 - "$WORK/ma" "$FILES" "$MIB" <<'PY'
import os, sys, time
root, files, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = mib * (1 << 20) // files
block = os.urandom(size)
t = time.time()
for d in range(0, files, 1000):
    os.mkdir(f"{root}/d{d // 1000:04}")
    for i in range(d, min(d + 1000, files)):
        with open(f"{root}/d{d // 1000:04}/f{i:06}", "wb") as f:
            f.write(block[i % 251:] + block[:i % 251])
print(f"wrote {files} files of {size} bytes in {time.time() - t:.0f} s", file=sys.stderr)
PY
"$B" tier --volume v --wait >/dev/null
start=$(date +%s.%N)
"$B" volume move v --to-site b --wait --json >"$WORK/move.json"
end=$(date +%s.%N)
mount_in b "$WORK/mb"
python3 - "$WORK/mb" "$WORK/move.json" "$start" "$end" "$FILES" "$MIB" "$RTT" "$BW" <<'PY'
import json, os, sys
root, move, start, end, files, mib, rtt, bw = sys.argv[1:]
m = json.load(open(move))
n = total = 0
for d, _, names in os.walk(root):
    for f in names:
        n += 1
        total += os.path.getsize(os.path.join(d, f))
print(json.dumps({"bench": "volume-move", "files": int(files), "mib": int(mib), "rtt": rtt, "bandwidth": bw,
                  "seconds": round(float(end) - float(start), 1), "copy_seconds": round(m["elapsed_secs"], 1),
                  "objects_moved": m["objects_done"], "bytes_moved": m["bytes_done"], "state": m["state"],
                  "files_seen_in_b": n, "bytes_seen_in_b": total}))
PY
