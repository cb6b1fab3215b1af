#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run: for a machine lent for a short time (minutes, its start
# included), where one command must do everything and bring back one file.
#
#   OUT=/some/dir bash scripts/gpu_check.sh          # from the repository root, with the image's Python
#   BUDGET=300 PYTEST_S=150 OUT=... bash scripts/gpu_check.sh
#
# It runs, each under its own time limit so a hang in one leaves time for the rest:
#   1. nvidia-smi and the versions of Python, CuPy, Numba and PyTorch;
#   2. the self-test (python -m lenet_gpu.selftest --budget $BUDGET): compile, parity, whole steps, graphs,
#      the profile of the graphed step (CUPTI through PyTorch where present), trainings, the benchmark;
#   3. the GPU twins of the tests whose kernels have not yet run on a GPU (pytest -m gpu on those files), when
#      pytest is installed (it needs nothing from the network);
# then packs everything into $OUT/gpu-check.tar.gz (one file: a lent machine brings back only a few).
# Budget: about BUDGET + PYTEST_S + 60 seconds (default about 8.5 minutes).
set -u
OUT=${OUT:-reports/gpu-check}
BUDGET=${BUDGET:-300}
PYTEST_S=${PYTEST_S:-150}
PY=${PYTHON:-python}
W="$OUT/gpu-check"
mkdir -p "$W"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$W/steps.txt"; }

log "start"
{ nvidia-smi; "$PY" -c "
import sys; print('python', sys.version.split()[0])
for m in ('numpy', 'cupy', 'numba', 'torch', 'pytest'):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, 'missing:', e)
"; } > "$W/env.txt" 2>&1
log "env rc $?"

timeout $((BUDGET + 60)) "$PY" -m lenet_gpu.selftest --budget "$BUDGET" --out "$W/selftest" > "$W/selftest.log" 2>&1
log "selftest rc $?"

TESTS="tests/test_step_fwd_update.py tests/test_step_bwd.py tests/test_head_v3.py tests/test_step4.py
tests/test_numba_step_fwd.py tests/test_numba_step_bwd.py tests/test_numba_head.py tests/test_numba_lenet_fwd_v2.py
tests/test_numba_backend.py tests/test_infer_api.py tests/test_head_v4.py
tests/test_lenet_fwd_v4.py tests/test_numba_lenet_fwd_v4.py"
if "$PY" -c "import pytest" 2>/dev/null; then
    # shellcheck disable=SC2086
    timeout "$PYTEST_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider --durations=15 $TESTS > "$W/pytest-gpu.log" 2>&1
    log "pytest -m gpu rc $?"
else
    log "pytest not installed: GPU twins not run"
fi

tar czf "$OUT/gpu-check.tar.gz" -C "$OUT" gpu-check && rm -rf "$W"
echo "packed $OUT/gpu-check.tar.gz"
