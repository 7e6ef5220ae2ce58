#!/usr/bin/env bash
# usage: scripts/bench-migrate.sh [MIB] [ROUNDS] [s3|azure] [copy|fio]   (defaults: 512 3 s3 copy)
# The migration figures of docs/BENCHMARKS.md ("Migration"): two object stores, one
# metadata node, one cache node (R=1) and a volume holding MIB MiB (4 MiB blocks, no
# compression) in the first store. The stores: an S3 protocol server (elea-s3-test-server,
# s3s-fs over a directory) and a second one (s3), or Azurite, the Azure Blob emulator from
# npm (azure: installed under ~/.cache/elea-bench on first use; a move between two kinds of
# cloud).
# Each round, in alternating order:
#  - migrate: `elea migrate --wait --json` moves the volume's objects to a new prefix on the
#    other server (MiB/s = bytes copied / the job's own time, from its record);
#  - copy: `elea bench store --copy-to` puts MIB MiB of 4 MiB objects in the server the
#    volume is in now and copies them to the other one with plain opendal GETs and PUTs, 8 in
#    flight (what the migration's copier keeps in flight): the baseline.
# With `fio` instead: the volume is mounted, fio (installed from Debian's packages when
# missing) lays out a 256 MiB file in it, and each round runs fio's random-read row (4 KiB,
# libaio, QD16, direct, 15 s) without a migration, then while a migration of the volume (MIB
# MiB: make it big enough to outlast the run) copies at full speed: IOPS with / without.
# Prints one JSON object per measurement and a summary line with the median ratio.
# ELEA_BIN / S3_BIN = paths use those binaries instead of release builds.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-512}; ROUNDS=${2:-3}; KIND=${3:-s3}; MODE=${4:-copy}
if [ -z "${ELEA_BIN:-}" ] || [ -z "${S3_BIN:-}" ]; then
  cargo build --release --locked -p elea -p elea-integration --bin elea --bin elea-s3-test-server >/dev/null
fi
B=${ELEA_BIN:-$PWD/target/release/elea}; S3=${S3_BIN:-$PWD/target/release/elea-s3-test-server}
WORK=$(mktemp -d /var/tmp/elea-migrate.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
export AWS_ACCESS_KEY_ID=elea-test AWS_SECRET_ACCESS_KEY=elea-test-secret
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 600); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; tail -n 5 "$WORK"/*.log >&2; exit 1; }

P1=$(free_port); P2=$(free_port); PM=$(free_port); PC=$(free_port)
mkdir -p "$WORK/s3a" "$WORK/s3b"
"$S3" --root "$WORK/s3a" --port "$P1" >"$WORK/s3a.log" 2>&1 & PIDS+=($!)
if [ "$KIND" = azure ]; then
  AZ=${XDG_CACHE_HOME:-$HOME/.cache}/elea-bench/azurite-3.37.0
  [ -x "$AZ/node_modules/.bin/azurite-blob" ] || npm install --silent --no-audit --no-fund --prefix "$AZ" azurite@3.37.0 >&2
  "$AZ/node_modules/.bin/azurite-blob" --blobHost 127.0.0.1 --blobPort "$P2" --location "$WORK/s3b" --silent \
    --skipApiVersionCheck >"$WORK/s3b.log" 2>&1 & PIDS+=($!)
  # Azurite's well-known development account.
  export AZURE_STORAGE_ACCOUNT=devstoreaccount1
  export AZURE_STORAGE_KEY=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==
else
  "$S3" --root "$WORK/s3b" --port "$P2" >"$WORK/s3b.log" 2>&1 & PIDS+=($!)
fi
url() { # PORT PREFIX
  if [ "$1" = "$P2" ] && [ "$KIND" = azure ]; then echo "az://elea/$2?endpoint=http://127.0.0.1:$1/devstoreaccount1"
  else echo "s3://elea/$2?endpoint=http://127.0.0.1:$1&region=us-east-1"; fi
}
make_container() { # PORT NAME: Azurite's container, made with a SharedKey-signed request
  python3 - "$1" "$2" <<'PY'
import base64, hashlib, hmac, os, sys, urllib.error, urllib.request
from email.utils import formatdate
port, container = sys.argv[1:]
account, key = os.environ["AZURE_STORAGE_ACCOUNT"], base64.b64decode(os.environ["AZURE_STORAGE_KEY"])
headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
ctype = "application/octet-stream"
# verb, content-encoding, -language, -length (empty for 0), -md5, -type, date, if-modified-since,
# if-match, if-none-match, if-unmodified-since, range; then the x-ms headers and the resource
to_sign = "\n".join(["PUT", "", "", "", "", ctype, "", "", "", "", "", ""]) + "\n"
to_sign += "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
to_sign += f"/{account}/{account}/{container}\nrestype:container"
sig = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/{account}/{container}?restype=container", method="PUT", data=b"")
for k, v in {**headers, "Content-Type": ctype, "Authorization": f"SharedKey {account}:{sig}"}.items():
    req.add_header(k, v)
try:
    urllib.request.urlopen(req).read()
except urllib.error.HTTPError as e:
    if e.code != 409:
        sys.exit(f"creating container {container}: {e.code} {e.read()[:300]!r}")
PY
}
META=127.0.0.1:$PM
"$B" meta --node-id 1 --listen "$META" --data-dir "$WORK/meta" --initial-cluster "1=$META" >"$WORK/meta.log" 2>&1 & PIDS+=($!)
"$B" cache --node-id 1 --site local --listen "127.0.0.1:$PC" --data-dir "$WORK/cache" --meta "$META" --staging-size 4G \
  >"$WORK/cache.log" 2>&1 & PIDS+=($!)
wait_port "$P1"; wait_port "$P2"; wait_port "$PM"; wait_port "$PC"
[ "$KIND" = azure ] && make_container "$P2" elea
for _ in $(seq 1 100); do "$B" status --meta "$META" --json 2>/dev/null | grep -q '"alive":true' && break; sleep 0.2; done
"$B" volume create v --meta "$META" --store "$(url "$P1" v0)" --replicas 1 --tier-after 1s --compression none >/dev/null
"$B" bench data --meta "$META" --volume v --size "${MIB}M" --threads 4 --no-cold --keep --json >"$WORK/write.json"
"$B" tier --meta "$META" --volume v --wait >/dev/null

on=1; n=0
M=(); C=()
migrate() { # moves the volume to a new prefix on the other server; its figures to $WORK/last
  n=$((n + 1))
  local port; if [ "$on" = 1 ]; then port=$P2; on=2; else port=$P1; on=1; fi
  "$B" migrate v --to "$(url "$port" "v$n")" --wait --json --meta "$META" >"$WORK/m$n.json"
  python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
print(json.dumps({"what": "migrate", "objects": d["objects_done"], "bytes": d["bytes_done"],
                  "seconds": round(d["elapsed_secs"], 2),
                  "mib_per_s": round(d["bytes_done"] / 2**20 / d["elapsed_secs"], 1)}))' "$WORK/m$n.json" >"$WORK/last"
  cat "$WORK/last"
  M+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mib_per_s"])' "$WORK/last")")
}
copy() { # FROM TO: the plain GET+PUT loop between the two stores, in the round's direction
  local from=$1 to=$2
  "$B" bench store --store "$(url "$from" base)" --copy-to "$(url "$to" base)" --size "${MIB}M" --threads 8 --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"what":"copy","mib_per_s":round(d["copy_mib_per_s"],1)}))' \
    >"$WORK/last"
  cat "$WORK/last"
  C+=("$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["mib_per_s"])' "$WORK/last")")
}
randread() { # fio's random-read row on the mount: IOPS
  fio --name=rr --filename="$WORK/mnt/rand.dat" --rw=randread --bs=4k --ioengine=libaio --iodepth=16 \
    --direct=1 --time_based --runtime=15 --randrepeat=0 --output-format=json \
    | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'
}
if [ "$MODE" = fio ]; then
  command -v fio >/dev/null || { apt-get update -qq >&2; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >&2; }
  mkdir -p "$WORK/mnt"
  "$B" mount --volume v --site local --meta "$META" "$WORK/mnt" >"$WORK/mount.log" 2>&1 & PIDS+=($!)
  for _ in $(seq 1 100); do mountpoint -q "$WORK/mnt" && break; sleep 0.1; done
  fio --name=layout --filename="$WORK/mnt/rand.dat" --bs=1M --size=256m --rw=write --end_fsync=1 --output=/dev/null
  for r in $(seq 1 "$ROUNDS"); do
    base=$(randread)
    n=$((n + 1))
    if [ "$on" = 1 ]; then port=$P2; on=2; else port=$P1; on=1; fi
    "$B" migrate v --to "$(url "$port" "v$n")" --json --meta "$META" >/dev/null
    during=$(randread)
    state=$("$B" migrate status v --json --meta "$META" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
    "$B" migrate status v --wait --json --meta "$META" >/dev/null
    echo "{\"what\": \"fio-randread-4k-qd16\", \"iops_alone\": $base, \"iops_during_migration\": $during, \"migration_at_end\": \"$state\"}"
    M+=("$during"); C+=("$base")
  done
  umount "$WORK/mnt" 2>/dev/null || umount -l "$WORK/mnt"
else
  for r in $(seq 1 "$ROUNDS"); do
    # Both in the direction the volume moves this round.
    if [ "$on" = 1 ]; then from=$P1; to=$P2; else from=$P2; to=$P1; fi
    if [ $((r % 2)) = 1 ]; then migrate; copy "$from" "$to"; else copy "$from" "$to"; migrate; fi
  done
fi
python3 -c '
import json, statistics, sys
mode, kind = sys.argv[3], sys.argv[4]
m = [float(x) for x in sys.argv[1].split()]; c = [float(x) for x in sys.argv[2].split()]
ratios = [a / b for a, b in zip(m, c)]
names = ("iops_during_migration", "iops_alone") if mode == "fio" else ("migrate_mib_per_s", "copy_mib_per_s")
print(json.dumps({"what": "summary", "stores": kind, names[0]: m, names[1]: c,
                  "ratios": [round(r, 3) for r in ratios], "median_ratio": round(statistics.median(ratios), 3)}))' \
  "${M[*]}" "${C[*]}" "$MODE" "$KIND"
