#!/usr/bin/env bash
# usage: scripts/bench-tree.sh DIR [TARBALL]
# Small files: extracts a tarball of a real source tree into DIR/elea-tree, reads every file
# back with a checksum (each compared with the tarball's), lists the tree, and removes it.
# Prints one JSON line with the files, bytes and files/s of each phase (extract, read, list,
# remove); exits non-zero if any file read back differs. Without TARBALL it builds one (once,
# kept under $BENCH_DIR, default /var/tmp) from the crates in the local cargo registry: whole
# crates in name order until about 30,000 files.
set -euo pipefail
DIR=${1:?usage: scripts/bench-tree.sh DIR [TARBALL]}
TARBALL=${2:-}
CACHE=${BENCH_DIR:-/var/tmp}
if [ -z "$TARBALL" ]; then
  TARBALL=$CACHE/elea-bench-tree.tar
  if [ ! -f "$TARBALL" ]; then
    SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ 2>/dev/null | head -1)
    [ -n "$SRC" ] || { echo "no crates in the cargo registry to build a tree from; give a TARBALL" >&2; exit 1; }
    python3 - "$SRC" "$TARBALL" <<'PY'
import os, sys, tarfile
src, out = sys.argv[1:]
files = 0
with tarfile.open(out + ".part", "w") as t:
    for crate in sorted(os.listdir(src)):
        if files >= 30000:
            break
        for root, dirs, names in os.walk(os.path.join(src, crate)):
            dirs.sort()
            files += len(names)
        t.add(os.path.join(src, crate), arcname=crate)
os.rename(out + ".part", out)
PY
  fi
fi
SUMS=$TARBALL.sha256
if [ ! -f "$SUMS" ] || [ "$SUMS" -ot "$TARBALL" ]; then
  # Each regular file's SHA-256 as the tarball holds it (what the read-back must match).
  python3 - "$TARBALL" "$SUMS" <<'PY'
import hashlib, sys, tarfile
tar, out = sys.argv[1:]
with tarfile.open(tar) as t, open(out + ".part", "w") as o:
    for m in t:
        if m.isfile():
            o.write(f"{hashlib.sha256(t.extractfile(m).read()).hexdigest()}  {m.name}\n")
import os; os.rename(out + ".part", out)
PY
fi
TREE=$DIR/elea-tree
rm -rf "$TREE"
mkdir -p "$TREE"
now() { date +%s.%N; }
FILES=$(wc -l < "$SUMS")
BYTES=$(python3 -c 'import os,sys,tarfile; print(sum(m.size for m in tarfile.open(sys.argv[1]) if m.isfile()))' "$TARBALL")

t0=$(now)
tar -xf "$TARBALL" -C "$TREE" --no-same-owner
t1=$(now)
# Read every file back (in the tarball's order, one process per 1,000 files) and compare.
(cd "$TREE" && cut -c67- "$SUMS" | tr '\n' '\0' | xargs -0 -n 1000 sha256sum --) > "$DIR/elea-tree.sums"
t2=$(now)
ENTRIES=$(find "$TREE" | wc -l)
t3=$(now)
rm -rf "$TREE"
t4=$(now)
BAD=$(diff <(sort -k2 "$SUMS") <(sort -k2 "$DIR/elea-tree.sums") | grep -c '^[<>]' || true)
rm -f "$DIR/elea-tree.sums"
python3 - "$DIR" "$TARBALL" "$FILES" "$BYTES" "$ENTRIES" "$BAD" "$t0" "$t1" "$t2" "$t3" "$t4" <<'PY'
import json, sys
d, tar, files, size, entries, bad = sys.argv[1:7]
t = [float(x) for x in sys.argv[7:]]
files, entries, bad = int(files), int(entries), int(bad)
phase = lambda i, n: {"seconds": round(t[i + 1] - t[i], 3), "files_per_s": round(n / max(t[i + 1] - t[i], 1e-9), 1)}
print(json.dumps({
    "benchmark": "tree", "dir": d, "tarball": tar, "files": files, "bytes": int(size), "entries": entries,
    "extract": phase(0, files), "read": phase(1, files), "list": phase(2, entries), "remove": phase(3, entries),
    "mismatched": bad,
}))
if bad:
    sys.exit(f"{bad} files read back differ from the tarball's")
PY
