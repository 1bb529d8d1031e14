#!/usr/bin/env bash
# Every check, in order: clean notebooks, library in sync, library notebooks, pytest; then the notebooks and the
# numerical tests once more with PyTorch's portable CPU kernels (ATEN_CPU_CAPABILITY=default).
# Called by `make test` (with the project's .venv first on PATH). Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
dirty() { { git diff -- nbs afd_nb experiments; git status --porcelain -- nbs afd_nb experiments; } | sha1sum; }
before=$(dirty)
t_all=$SECONDS
echo "== 1/5 notebooks are clean (nbdev_clean leaves no diff)"
nbdev_clean
[ -d experiments ] && nbdev_clean --fname experiments
if [ "$(dirty)" != "$before" ]; then
  echo "FAIL: nbdev_clean changed notebooks; run 'nbdev_clean' and commit:"; git status --porcelain -- nbs experiments; exit 1
fi
echo "== 2/5 library is in sync (nbdev_export leaves no diff)"
nbdev_export
if [ "$(dirty)" != "$before" ]; then
  echo "FAIL: nbdev_export changed afd_nb/; run 'nbdev_export' and commit:"; git status --porcelain -- afd_nb; exit 1
fi

notebooks() {  # library notebooks, 2 at a time, 1 thread each; extra arguments go to nbdev_test
  local start=$SECONDS
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing "$@"
  echo "   (notebooks took $((SECONDS-start)) s)"
}
echo "== 3/5 nbdev_test runs every library notebook"
notebooks
echo "== 4/5 pytest tests/"
start=$SECONDS
# two pytest workers (pytest-xdist), one per core; PYTEST_WORKERS=0 runs them in this process
python -m pytest tests -q -rs --durations=15 -n "${PYTEST_WORKERS:-2}" "$@"
echo "   (pytest took $((SECONDS-start)) s)"

# PyTorch chooses its CPU kernels by instruction set (AVX-512, AVX2, ...). 'default' forces the portable ones, which
# round and sum in another order, as another CPU would. Every tolerance is derived to hold on any CPU; this pass checks
# that on this one. It reruns the notebooks and the pytest modules whose assertions compare floating-point results
# (the others -- data files, configuration, sweeps, project layout -- do not depend on the kernels).
NUMERIC_TESTS=(test_attacks test_gap test_disentangle test_losses test_models test_train test_resume test_baselines
               test_evaluate test_pretrain test_ddp)
echo "== 5/5 again with ATEN_CPU_CAPABILITY=default: the numerical notebooks and ${#NUMERIC_TESTS[@]} numerical test modules"
export ATEN_CPU_CAPABILITY=default
python -c "import torch; c = torch.backends.cpu.get_cpu_capability(); assert c == 'DEFAULT', c; print('   kernels:', c)"
# Left out of this pass, because they compare no kernel results: 00a_download (files, checksums, locks), 06a_run_folder
# and 06b_checkpoint (folders, atomic writes, locks), 10_sweep and 10b_report (planning, running and reporting sweeps:
# their checks are on files, states and table layout), 11_bench (timings and pass counts), 14_plots (the palette) and
# 16_cpu_scale (reads committed results). Every other notebook runs again.
notebooks --skip_file_re '^([_.]|00a_download|06a_run_folder|06b_checkpoint|10_sweep|10b_report|11_bench|14_plots|16_cpu_scale)'
start=$SECONDS
files=(); for m in "${NUMERIC_TESTS[@]}"; do
  [ -f "tests/$m.py" ] || { echo "FAIL: tests/$m.py is listed in NUMERIC_TESTS (tests/check.sh) but does not exist"; exit 1; }
  files+=("tests/$m.py")
done
python -m pytest "${files[@]}" -q -rs --durations=5 -n "${PYTEST_WORKERS:-2}" "$@"
echo "   (pytest took $((SECONDS-start)) s)"
echo "== all checks passed in $(( (SECONDS-t_all) / 60 )) min"
