#!/usr/bin/env bash
# usage: scripts/bench-nonroot.sh DELAY_MS FILES [ELEA_BIN...]
# Creates and then unlinks FILES files as user `nobody` on a mount whose metadata service is
# DELAY_MS milliseconds away each way (0 for none): everything talks to the metadata node
# through a local TCP proxy that holds each chunk that long, as a metadata leader on another
# host or in another zone would be (the proxy itself adds some tens of microseconds). Prints
# one JSON line per binary (creates/s, unlinks/s). Give several binaries to compare builds;
# run it several times and compare per pair. Needs root (it mounts, and runs the workload as
# `nobody` with setpriv). Without ELEA_BIN arguments it builds and uses target/release/elea.
set -euo pipefail
cd "$(dirname "$0")/.."
DELAY=${1:?$(sed -n 2p "$0")}; FILES=${2:?$(sed -n 2p "$0")}; shift 2
BINS=("$@")
if [ ${#BINS[@]} -eq 0 ]; then
  cargo build --release --locked -p elea >/dev/null
  BINS=(./target/release/elea)
fi
DIR=$(mktemp -d)
chmod 755 "$DIR"
PIDS=()
stop() {
  [ -n "${MNT:-}" ] && { fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true; }
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  PIDS=()
}
cleanup() { stop; rm -rf "$DIR"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A TCP proxy that holds every chunk DELAY ms before passing it on, in order, both ways.
cat >"$DIR/delay.py" <<'PY'
import asyncio, socket, sys, time
listen, target, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]) / 1000
async def pump(r, w):
    q = asyncio.Queue()
    async def send():
        while (item := await q.get()) is not None:
            t, data = item
            if (wait := t + delay - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            w.write(data)
            await w.drain()
        w.close()
    s = asyncio.create_task(send())
    try:
        while data := await r.read(65536):
            q.put_nowait((time.monotonic(), data))
    finally:
        q.put_nowait(None)
        await s
async def conn(r, w):
    r2, w2 = await asyncio.open_connection("127.0.0.1", target)
    for x in (w, w2):
        x.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await asyncio.gather(pump(r, w2), pump(r2, w), return_exceptions=True)
async def main():
    srv = await asyncio.start_server(conn, "127.0.0.1", listen)
    await srv.serve_forever()
asyncio.run(main())
PY

# The workload, as `nobody`.
cat >"$DIR/work.py" <<'PY'
import json, os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
names = [os.path.join(d, f"f{i}") for i in range(n)]
t = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
c = time.perf_counter() - t
t = time.perf_counter()
for p in names:
    os.unlink(p)
u = time.perf_counter() - t
print(json.dumps({"bin": sys.argv[3], "delay_ms": float(sys.argv[4]), "files": n,
                  "creates_per_s": round(n / c), "unlinks_per_s": round(n / u)}))
PY

run() {
  local b=$1 d mp pp m
  d=$(mktemp -d -p "$DIR")
  chmod 755 "$d"
  MNT=$d/mnt
  mkdir -p "$MNT" "$d/store"
  mp=$(port); pp=$(port); m=127.0.0.1:$pp
  RUST_LOG=warn "$b" meta --node-id 1 --listen "127.0.0.1:$mp" --advertise "$m" \
    --data-dir "$d/meta" --initial-cluster "1=$m" >"$d/meta.log" 2>&1 &
  PIDS+=($!)
  python3 "$DIR/delay.py" "$pp" "$mp" "$DELAY" &
  PIDS+=($!)
  for _ in $(seq 1 100); do "$b" status --meta "$m" --json 2>/dev/null | grep -q '"leader_id":1' && break; sleep 0.1; done
  "$b" volume create --meta "$m" --store "file://$d/store" --replicas 1 v >/dev/null
  RUST_LOG=warn "$b" cache --node-id 1 --site local --listen "127.0.0.1:$(port)" \
    --data-dir "$d/cache" --meta "$m" >"$d/cache.log" 2>&1 &
  PIDS+=($!)
  RUST_LOG=warn "$b" mount --meta "$m" --volume v "$MNT" >"$d/mount.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
  mountpoint -q "$MNT" || { cat "$d"/*.log >&2; exit 1; }
  mkdir "$MNT/w" && chown nobody "$MNT/w"
  setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 "$DIR/work.py" "$MNT/w" "$FILES" "$b" "$DELAY"
  stop
}

for b in "${BINS[@]}"; do run "$b"; done
