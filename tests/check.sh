#!/usr/bin/env bash
# Every check, in order: clean notebooks, library in sync, library notebooks, pytest.
# Called by `make test` (with the project's .venv first on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
dirty() { { git diff -- nbs afd_nb experiments; git status --porcelain -- nbs afd_nb experiments; } | sha1sum; }
before=$(dirty)
echo "== 1/4 notebooks are clean (nbdev_clean leaves no diff)"
nbdev_clean
[ -d experiments ] && nbdev_clean --fname experiments
if [ "$(dirty)" != "$before" ]; then
  echo "FAIL: nbdev_clean changed notebooks; run 'nbdev_clean' and commit:"; git status --porcelain -- nbs experiments; exit 1
fi
echo "== 2/4 library is in sync (nbdev_export leaves no diff)"
nbdev_export
if [ "$(dirty)" != "$before" ]; then
  echo "FAIL: nbdev_export changed afd_nb/; run 'nbdev_export' and commit:"; git status --porcelain -- afd_nb; exit 1
fi
echo "== 3/4 nbdev_test runs every library notebook"
start=$SECONDS
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing  # 2 notebooks at a time, 1 thread each
echo "   (notebooks took $((SECONDS-start)) s)"
echo "== 4/4 pytest tests/"
python -m pytest tests -q -rs --durations=15 "$@"
