#!/usr/bin/env bash
# usage: scripts/bench-fsync.sh DIR [SECONDS]     (default 20)
# What a database's commit costs: fio writes 4 KiB at random offsets of a 64 MiB file and
# fsyncs after every write, with one writer (queue depth 1) and with eight writers on their
# own files (queue depth 8). Prints one JSON line per depth: writes+fsyncs per second, and
# the p50/p99 latency in microseconds of the write and of the fsync that follows it.
set -euo pipefail
DIR=${1:?usage: scripts/bench-fsync.sh DIR [SECONDS]}
SECS=${2:-20}
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; } >&2
W=$DIR/elea-fsync
mkdir -p "$W"
trap 'rm -rf "$W"' EXIT
for qd in 1 8; do
  fio --name=fsync --directory="$W" --rw=randwrite --bs=4k --size=64m --fsync=1 \
    --ioengine=psync --numjobs="$qd" --group_reporting --time_based --runtime="$SECS" \
    --output-format=json --output="$W/out.json" >/dev/null
  python3 - "$W/out.json" "$DIR" "$qd" <<'PY'
import json, sys
f, d, qd = sys.argv[1:]
j = json.load(open(f))["jobs"][0]
w, s = j["write"], j["sync"]
pct = lambda lat, p: round(lat.get("percentile", {}).get(p, 0) / 1000, 1)
print(json.dumps({
    "benchmark": "fsync", "dir": d, "queue_depth": int(qd), "block": 4096,
    "iops": round(w["iops"], 1),
    "write_us": {"p50": pct(w["clat_ns"], "50.000000"), "p99": pct(w["clat_ns"], "99.000000")},
    "fsync_us": {"p50": pct(s["lat_ns"], "50.000000"), "p99": pct(s["lat_ns"], "99.000000")},
}))
PY
  rm -f "$W"/fsync.*
done
