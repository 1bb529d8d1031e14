#!/usr/bin/env bash
# Shows offline what a first `make demo` does on a machine without data: in a temporary copy of this repository with
# an empty data/ folder and AFD_DATA unset, it serves an official-layout cifar-10-python.tar.gz (holding the exact
# subset: official train[0:4000], test[0:1000]) and the akamaster weights on 127.0.0.1, points AFD_MIRROR at that
# server, and runs only the demo's data and weights step (the same calls as the demo's fine-tune, from a
# papermill-like working directory runs/demo/<run>/). As the demo's two runs do, the two data steps start together,
# on the empty data/ folder: one fetches and unpacks, the other waits for it and uses the result. It does not run the
# demo itself (about 15 CPU-minutes).
#
#   AFD_DATA=/folder/with/the/data tools/offline_demo_check.sh
#
# AFD_DATA is needed only to build the mirror (the exact CIFAR-10 subset and weights/resnet*.th); the fetch step runs
# with AFD_DATA unset. The archive served is not the official file, so its checksum comes from a local manifest
# (AFD_MIRROR_CHECKSUMS); the weights are the official files, checked against the pinned SHA-256.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
: "${AFD_DATA:?set AFD_DATA to a folder holding the exact CIFAR-10 subset and weights/, to build the mirror from}"
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
TMP=$(mktemp -d); SERVER=
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

echo "== 1. a copy of the repository (tracked files) in $TMP/repo, data/ holds only README.md"
mkdir "$TMP/repo"; (cd "$REPO" && git ls-files -z | tar --null -cf - -T -) | tar -xf - -C "$TMP/repo"
ls -A "$TMP/repo/data"

echo "== 2. the mirror, built from \$AFD_DATA=$AFD_DATA"
(cd "$REPO" && PYTHONPATH="$REPO" "$PY" tests/test_download.py mirror "$TMP/m") | head -1
ls -l "$TMP/m/mirror" | tail -n +2; cat "$TMP/m/CHECKSUMS"

unset AFD_DATA AFD_DOWNLOAD AFD_MIRROR AFD_MIRROR_CHECKSUMS
export PYTHONPATH="$TMP/repo"
RUN="$TMP/repo/runs/demo/vaft"; RUN2="$TMP/repo/runs/demo/afd"   # papermill's cwds; their data/ must never be used
mkdir -p "$RUN/data" "$RUN2/data"
cd "$RUN"
STEP='
import time, torch
from afd_nb.data import get_dataset
from afd_nb.models import load_pretrained
t = time.time()
tr = get_dataset("cifar10", "train", flavour="exact", n=2000)     # configs/demo.yaml: n_train 2000
te = get_dataset("cifar10", "test", flavour="exact")              # n_test 1000
m = load_pretrained("resnet20")
print(f"train {tuple(tr.x.shape)} from {tr.source}; test {tuple(te.x.shape)}; resnet20 loaded ({time.time() - t:.1f} s)")
with torch.no_grad(): acc = (m(te.x[:200].float() / 255).argmax(1) == te.y[:200]).float().mean().item()
print(f"resnet20 clean accuracy on exact test[0:200]: {100 * acc:.1f} %")
'

echo; echo "== 3. offline (no server listening), downloads on: the message names the file and the folder"
AFD_MIRROR=http://127.0.0.1:9 "$PY" -c "$STEP" 2>&1 | awk '/^afd_nb: / {print; next} /^afd_nb\.download\./ {buf = ""} {buf = buf $0 "\n"} END {printf "%s", buf}' || true   # the last exception
echo; echo "== 4. AFD_DOWNLOAD=0: the same, without trying"
AFD_DOWNLOAD=0 "$PY" -c "$STEP" 2>&1 | awk '/^afd_nb: / {print; next} /^afd_nb\.download\./ {buf = ""} {buf = buf $0 "\n"} END {printf "%s", buf}' || true   # the last exception

echo; echo "== 5. the mirror on 127.0.0.1 and the demo's data + weights step, in two processes at once (vaft, afd)"
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$PY" -m http.server "$PORT" --bind 127.0.0.1 --directory "$TMP/m/mirror" >"$TMP/server.log" 2>&1 & SERVER=$!
for _ in $(seq 50); do "$PY" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break; sleep 0.1; done
export AFD_MIRROR=http://127.0.0.1:$PORT AFD_MIRROR_CHECKSUMS=$TMP/m/CHECKSUMS
echo "AFD_MIRROR=$AFD_MIRROR AFD_MIRROR_CHECKSUMS=$AFD_MIRROR_CHECKSUMS (cwds: runs/demo/vaft, runs/demo/afd)"
(cd "$RUN" && "$PY" -c "$STEP" >"$TMP/vaft.log" 2>&1) & A=$!
(cd "$RUN2" && "$PY" -c "$STEP" >"$TMP/afd.log" 2>&1) & B=$!
ra=0; wait $A || ra=$?; rb=0; wait $B || rb=$?
for r in vaft afd; do echo "-- $r:"; tr '\r' '\n' <"$TMP/$r.log" | grep -v '^\s*$' | grep -v '%|' || true; done
echo "exit status: vaft $ra, afd $rb; GET requests to the mirror: $(grep -c '"GET /[^ ]' "$TMP/server.log" || true) (one per file)"
[ "$ra" = 0 ] && [ "$rb" = 0 ] || { echo "FAILED: a data step failed"; exit 1; }

echo; echo "== 6. checksums of what was fetched (expected: the manifest for the archive, the pinned SHA-256 for the weights)"
"$PY" - <<'PY'
from afd_nb.download import REMOTES, project_data_dir, file_checksum, source, verify
d = project_data_dir()
for name, f in [('cifar-10-python.tar.gz', d/'cifar-10-python.tar.gz'), ('resnet20-12fca82f.th', d/'weights'/'resnet20-12fca82f.th')]:
    url, want, origin = source(REMOTES[name])
    print(f'{f.relative_to(d.parent)}: {file_checksum(f, want.split(":")[0])} ({origin}: {"match" if verify(f, REMOTES[name]) else "MISMATCH"})')
PY

echo; echo "== 7. a second run fetches nothing (server requests before / after)"
n=$(grep -c '"GET /[^ ]' "$TMP/server.log" || true)
"$PY" -c "$STEP" 2>&1 | grep -v '^\s*$'
echo "GET requests to the mirror: $n before, $(grep -c '"GET /[^ ]' "$TMP/server.log" || true) after"

echo; echo "== 8. the project's data/ folder, and papermill's cwds' data/ (must stay empty)"
cd "$TMP/repo"; find data runs/demo/vaft/data runs/demo/afd/data -maxdepth 2 | sort | while read -r p; do
  if [ -f "$p" ]; then printf '%10d  %s\n' "$(stat -c %s "$p")" "$p"; else printf '%10s  %s/\n' '' "$p"; fi; done
du -sh data
