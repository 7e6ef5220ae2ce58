#!/usr/bin/env bash
# usage: scripts/bench-sites.sh [RTT] [BANDWIDTH] [MIB]   (defaults: 20ms 100MiB 128; needs root,
# iproute2, nsenter and /dev/fuse)
# The multi-site figures of docs/BENCHMARKS.md ("Sites"), in one run:
#  - meta-home, data-home: `elea bench meta`, and MIB MiB written (fsync) and read back through
#    fresh mounts, run in site a of a one-site sandbox (`elea demo --sites a`), then in site a
#    of a two-site one (`--sites a,b`, links of RTT and BANDWIDTH): the home site's cost of a
#    second site; the metadata benchmark also on two sites with no metadata node in b (on one
#    machine, b's learner applies every entry on the same two cores as a's voter);
#  - meta-remote: `elea bench meta --threads 1` run in site b on a volume homed in a: what one
#    metadata call from the other site costs (p50 per phase, against the RTT); meta-b-home-b:
#    the same in b on a volume homed in b (its own Raft group, voter in b): local latency;
#  - meta-spread: three sites, one metadata node each: `elea bench meta --threads 1` in a on a
#    volume homed in a with --spread-voters (a voter per site: every commit waits for a round
#    trip to another site) and on one homed in a only (the reference);
#  - data: MIB MiB written through a mount in a, read through a mount in b (the first read
#    crosses the link: MiB/s against BANDWIDTH), read again through a fresh mount in b (from
#    b's cache nodes), and MIB MiB written and read in b (the local reference).
# Prints one JSON object per line. ELEA_BIN=PATH uses that binary instead of a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
RTT=${1:-20ms}; BW=${2:-100MiB}; MIB=${3:-128}
if [ -n "${ELEA_BIN:-}" ]; then B=$ELEA_BIN; else cargo build --release --locked -p elea >/dev/null; B=$PWD/target/release/elea; fi
WORK=$(mktemp -d /var/tmp/elea-sites.XXXXXX)
DEMO=""; MOUNTS=()
cleanup() {
  for m in "${MOUNTS[@]}"; do umount -l "$m" 2>/dev/null || true; done
  [ -n "$DEMO" ] && { kill -TERM "$DEMO" 2>/dev/null; wait "$DEMO" 2>/dev/null || true; }
  rm -rf "$WORK"
}
trap cleanup EXIT
j() { python3 -c "import json,sys; d=json.load(open('$1')); print(eval(sys.argv[1]))" "$2"; }

start_demo() { # SITES [demo flags]
  local sites=$1; shift
  rm -rf "$WORK/demo"; rm -f "$WORK/demo.json"
  "$B" demo --dir "$WORK/demo" --sites "$sites" --wan-rtt "$RTT" --wan-bandwidth "$BW" --json-out "$WORK/demo.json" \
    "$@" >"$WORK/demo.log" 2>&1 &
  DEMO=$!
  for _ in $(seq 1 600); do [ -f "$WORK/demo.json" ] && break; sleep 0.2; done
  [ -f "$WORK/demo.json" ] || { cat "$WORK/demo.log"; exit 1; }
  export ELEA_META=$(j "$WORK/demo.json" 'd["meta"]') ELEA_CA=$(j "$WORK/demo.json" 'd["certs"]["ca"]')
  export ELEA_CERT=$(j "$WORK/demo.json" 'd["certs"]["cert"]') ELEA_KEY=$(j "$WORK/demo.json" 'd["certs"]["key"]')
}
stop_demo() { kill -TERM "$DEMO"; wait "$DEMO" || true; DEMO=""; }
in_site() { local ns; ns=$(j "$WORK/demo.json" "d['sites']['$1']['netns']"); shift; nsenter --net=/run/netns/"$ns" "$@"; }
mount_in() { # SITE VOLUME MOUNTPOINT
  mkdir -p "$3"; in_site "$1" "$B" mount --volume "$2" --site "$1" "$3" >"$3.log" 2>&1 &
  MOUNTS+=("$3")
  for _ in $(seq 1 300); do mountpoint -q "$3" && return; sleep 0.1; done
  cat "$3.log"; exit 1
}
unmount() { umount "$1"; for _ in $(seq 1 100); do mountpoint -q "$1" || return 0; sleep 0.1; done; }
secs() { python3 -c 'import sys,time; t=time.time(); import subprocess; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(f"{time.time()-t:.3f}")' "$@"; }
volume_in() { # NAME HOME [flags]: a volume in a Raft group of its own homed in HOME
  local name=$1 home=$2; shift 2
  "$B" volume create "$name" --home-site "$home" --store "$(j "$WORK/demo.json" "d['sites']['$home']['store']")" \
    --shared-file-store "$@" >/dev/null
}
meta_bench() { # SITE LABEL THREADS FILES VOLUME
  local out; out=$(in_site "$1" "$B" bench meta --threads "$3" --files "$4" --volume "$5" --json)
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['bench']=sys.argv[2]; d['site']=sys.argv[3]; print(json.dumps(d))" "$out" "$2" "$1"
}

home_data() { # LABEL: sequential write (fsync) and read through a fresh mount, in site a
  "$B" volume create h --home-site a --store "$(j "$WORK/demo.json" 'd["sites"]["a"]["store"]')" --shared-file-store >/dev/null
  mount_in a h "$WORK/h1"
  local w r; w=$(secs dd if="$WORK/src" of="$WORK/h1/f" bs=4M conv=fsync)
  unmount "$WORK/h1"; mount_in a h "$WORK/h2"
  r=$(secs dd if="$WORK/h2/f" of=/dev/null bs=4M)
  unmount "$WORK/h2"
  python3 -c "import json,sys; m=int(sys.argv[2]); print(json.dumps({'bench': sys.argv[1], 'site': 'a', 'mib': m, 'write_mib_s': round(m/float(sys.argv[3]),1), 'read_mib_s': round(m/float(sys.argv[4]),1)}))" "$1" "$MIB" "$w" "$r"
}

dd if=/dev/urandom of="$WORK/src" bs=1M count="$MIB" status=none
start_demo a
volume_in m a; meta_bench a meta-home-one-site 16 4000 m
home_data data-home-one-site
stop_demo
start_demo a,b --meta-per-site 1,0
volume_in m a; meta_bench a meta-home-two-sites-no-learner 16 4000 m
stop_demo
start_demo a,b,c --meta-per-site 1,1,1
volume_in ma a; volume_in ms a --spread-voters
meta_bench a meta-home-only 1 200 ma
meta_bench a meta-spread 1 200 ms
stop_demo
start_demo a,b
volume_in m a; meta_bench a meta-home-two-sites 16 4000 m
home_data data-home-two-sites
meta_bench b meta-remote 1 200 m
volume_in mb b; meta_bench b meta-b-home-b 1 200 mb
"$B" volume create v --home-site a --store "$(j "$WORK/demo.json" 'd["sites"]["a"]["store"]')" --shared-file-store >/dev/null
"$B" volume add-store v --site b "$(j "$WORK/demo.json" 'd["sites"]["b"]["store"]')" >/dev/null
mount_in a v "$WORK/ma"; mount_in b v "$WORK/mb"
write_a=$(secs dd if="$WORK/src" of="$WORK/ma/fa" bs=4M conv=fsync)
first_b=$(secs dd if="$WORK/mb/fa" of=/dev/null bs=4M)
cmp "$WORK/src" "$WORK/mb/fa"
unmount "$WORK/mb"; mount_in b v "$WORK/mb2"
second_b=$(secs dd if="$WORK/mb2/fa" of=/dev/null bs=4M)
write_b=$(secs dd if="$WORK/src" of="$WORK/mb2/fb" bs=4M conv=fsync)
unmount "$WORK/mb2"; mount_in b v "$WORK/mb3"
local_b=$(secs dd if="$WORK/mb3/fb" of=/dev/null bs=4M)
transfers=$("$B" status --json | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["transfers"]))')
python3 - "$MIB" "$BW" "$RTT" "$write_a" "$first_b" "$second_b" "$write_b" "$local_b" "$transfers" <<'PY'
import json, sys
mib, bw, rtt = int(sys.argv[1]), sys.argv[2], sys.argv[3]
w_a, first, second, w_b, local = map(float, sys.argv[4:9])
units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
num = "".join(c for c in bw if c.isdigit()); unit = bw[len(num):].lower()[:1]
cap = int(num) * units.get(unit, 1) / (1 << 20)
print(json.dumps({"bench": "data", "mib": mib, "rtt": rtt, "cap_mib_s": cap,
  "write_a_mib_s": round(mib / w_a, 1), "first_read_b_mib_s": round(mib / first, 1),
  "first_read_of_cap": round(mib / first / cap, 3), "second_read_b_mib_s": round(mib / second, 1),
  "write_b_mib_s": round(mib / w_b, 1), "read_b_written_in_b_mib_s": round(mib / local, 1),
  "second_over_local": round(local / second, 3) if second else None,
  "transfers": json.loads(sys.argv[9])}))
PY
