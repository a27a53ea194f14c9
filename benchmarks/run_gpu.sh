#!/usr/bin/env bash
# On a GPU machine, in one command: build the CUDA extension, run the GPU tests, run the GPU suite.
#   BISE_COMMIT=<git sha> bash benchmarks/run_gpu.sh [OUT_DIR]      (docs/gpu_suite.md)
# Every step has a time limit (build 300 s, tests TESTS_S = 180 s, suite 540 s with a 480 s budget), cut to what
# is left of DEADLINE_S seconds when that is set (scripts/device_session.sh: one device call); a step
# that finds no second left is skipped. The suite's JSON (rewritten after every case) lands in OUT_DIR
# (default benchmarks/results, to commit); the logs too when OUT_DIR is given, else in a temporary
# folder: build.log, gpu-tests.log (pytest -v: each test's outcome as it ends, so a run cut by the time
# limit still names what passed, what failed and what was running), gpu-tests.json (outcomes, the
# failures' messages, the slowest tests; also the suite JSON's `gpu_tests`), suite.log.
# Exit status: 1 if the build failed, 2 if a GPU test failed, 3 if the suite did not finish.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-benchmarks/results}
LOG_DIR=${1:-$(mktemp -d)}
mkdir -p "$OUT_DIR" "$LOG_DIR"
. scripts/deadline.sh 1020  # cap LIMIT: a step's time limit within DEADLINE_S
export PYTHONPATH=$PWD CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} BISE_KERNELS_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
# The CUDA backend's tests first (crash-free, exact), the Triton ones (compiling) last, in a second
# pytest run: "triton" in a test's id selects the Triton files and the triton-cuda cases of the shared
# kernel-test files (their kernels fixture runs every backend, function by function), so a run cut
# by TESTS_S has checked the default path.
GPU_TESTS="tests/kernels/test_native_checks.py tests/kernels/test_select_cuda.py tests/kernels/test_masked_cuda.py
tests/kernels/test_masked_native_eager.py tests/kernels/test_backends.py tests/kernels/test_select_kernels.py
tests/kernels/test_masked_kernels.py tests/kernels/test_masked_keep.py tests/kernels/test_masked_conv_keep.py
tests/kernels/test_determinism.py
tests/kernels/test_select_triton.py tests/kernels/test_masked_triton.py"
TESTS_S=${TESTS_S:-180}

log "build" && if ! timeout "$(cap 300)" python3 setup.py build_ext --inplace >"$LOG_DIR/build.log" 2>&1; then
  tail -20 "$LOG_DIR/build.log"; exit 1
fi
status=0
# -m "not slow": the slow tests there compile for sm_90 without a GPU, pointless on one.
# BISE_KERNELS_AUTOTUNE=0: one heuristic tile per Triton GEMM shape bucket, compiled once, instead of
# compiling and timing up to four (the tests check results; the suite autotunes and checks its own).
# -v (unbuffered): a line per test as it ends; -rA: the failures' messages at the end; --timeout: a
# hung or endlessly compiling test fails after TEST_TIMEOUT_S (pytest-timeout, when installed: the
# device's image has it) instead of eating the whole TESTS_S; JUnit XML: every test's seconds.
junit_dir=$(mktemp -d)
timeout_opt=()
if python3 -c "import pytest_timeout" 2>/dev/null; then timeout_opt=(--timeout="${TEST_TIMEOUT_S:-30}"); fi
log "GPU tests" && tests_end=$((SECONDS + $(cap "$TESTS_S"))) && : >"$LOG_DIR/gpu-tests.log"
n=0
for selection in "not triton" "triton"; do
  n=$((n + 1))
  left_s=$((tests_end - SECONDS))
  if [ "$left_s" -lt 1 ]; then
    echo "no time left for -k '$selection'" | tee -a "$LOG_DIR/gpu-tests.log"; status=2; break
  fi
  echo "== -k '$selection'" >>"$LOG_DIR/gpu-tests.log"
  BISE_KERNELS_AUTOTUNE=0 PYTHONUNBUFFERED=1 timeout "$left_s" python3 -m pytest -v -rA --durations=20 "${timeout_opt[@]}" \
    --junitxml="$junit_dir/tests-$n.xml" -m "not slow" -k "$selection" $GPU_TESTS >>"$LOG_DIR/gpu-tests.log" 2>&1 || status=2
  tail -3 "$LOG_DIR/gpu-tests.log"
done
timeout "$(cap 60)" python3 benchmarks/gpu_suite.py --summarize-tests "$LOG_DIR/gpu-tests.log" "$junit_dir"/*.xml \
  >"$LOG_DIR/gpu-tests.json" 2>>"$LOG_DIR/gpu-tests.log" || echo "no summary of the GPU tests"
if expired; then
  log "no time left for the GPU suite"; exit 3
fi
# No case starts after the budget; one that started may run its case limit past it, so budget + case
# limit stays within the suite's timeout (60 s of 540; a quarter when 120 s or less are left).
suite_s=$(cap 540)
case_s=$((suite_s > 120 ? 60 : (suite_s + 3) / 4))
log "GPU suite" && timeout "$suite_s" python3 benchmarks/gpu_suite.py --out "$OUT_DIR" \
  --budget-s $((suite_s > 120 ? suite_s - case_s : suite_s / 2)) --case-timeout-s "$case_s" --gpu-tests "$LOG_DIR/gpu-tests.json" \
  2>&1 | tee "$LOG_DIR/suite.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=3
log "done (exit status $status)"
exit $status
