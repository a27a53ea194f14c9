#!/usr/bin/env bash
# Everything a lent GPU should measure, sized for the device budget: 15 minutes in all, machine start
# included, and at most 600 s per call (../shared/gpu/README.md). Two calls on one warm machine:
#
#   kernels   (~450 s): build the CUDA extension, the GPU tests, the GPU suite (benchmarks/run_gpu.sh)
#   workflow  (~270 s): `bise run` on BiasedMNIST with the paper schedule (scripts/gpu_workflow.sh)
#
#   BISE_COMMIT=<sha> DEADLINE_S=450 bash scripts/device_session.sh kernels  [OUT]
#   BISE_COMMIT=<sha> DEADLINE_S=270 bash scripts/device_session.sh workflow [OUT]
#   bash scripts/device_session.sh --dry-run kernels|workflow [OUT]     # the wiring, on the CPU
#
# OUT defaults to $OUT (the device tool's folder that comes back), else benchmarks/results. Each step
# gets what is left of DEADLINE_S (its own cap below it), so the call ends before the tool's limit and
# every JSON written so far comes back. The workflow needs what the device has no registry for:
# carry `.data` (BiasedMNIST's digits) and `.whl` (the torch-pruning wheel: `pip download --no-deps
# torch-pruning==1.6.1 -d .whl` here first); docs/gpu_suite.md gives the exact `run` calls. Optional:
# carry `.official` (the official BISE code's files, a real folder, not a link; docs/workflow.md) and the
# workflow part ends by timing its per-epoch cost beside ours in what is left of DEADLINE_S.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PART="${1:?usage: device_session.sh [--dry-run] kernels|workflow [OUT]}"
OUT_DIR="${2:-${OUT:-benchmarks/results}}"
mkdir -p "$OUT_DIR"
export DEADLINE_S="${DEADLINE_S:-$([ "$PART" = workflow ] && echo 270 || echo 450)}"
export BISE_DATA_DIR="${BISE_DATA_DIR:-$PWD/.data}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ echo "part=$PART dry=$DRY deadline_s=$DEADLINE_S commit=${BISE_COMMIT:-$(git rev-parse --short=8 HEAD 2>/dev/null)}"
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
} | tee "$OUT_DIR/session-$PART.txt"

case "$PART" in
  kernels)
    if [ "$DRY" = 1 ]; then
      exec python3 benchmarks/gpu_suite.py --dry-run --out "$OUT_DIR" --budget-s "$DEADLINE_S"
    fi
    TESTS_S=${TESTS_S:-120} exec bash benchmarks/run_gpu.sh "$OUT_DIR"
    ;;
  workflow)
    if ! python3 -c "import torch_pruning" 2>/dev/null; then
      wheel=$(ls .whl/torch_pruning-*.whl 2>/dev/null | head -1)
      if [ -z "$wheel" ]; then echo "no torch_pruning and no .whl/torch_pruning-*.whl to install it from"; exit 4; fi
      python3 -m pip install -q --no-index --no-deps "$wheel" || exit 4
    fi
    if [ "$DRY" = 0 ] && ! python3 -c "import sys, bise_kernels._C as c; sys.exit(not getattr(c, 'WITH_CUDA', False))" 2>/dev/null; then
      echo "== build (no CUDA extension from the kernels call)"
      BISE_KERNELS_BUILD_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        MAX_JOBS=${MAX_JOBS:-16} timeout 120 python3 setup.py build_ext --inplace >"$OUT_DIR/build-workflow.log" 2>&1 \
        || echo "build failed (rc $?): the workflow runs on the reference kernels"
    fi
    if [ "$DRY" = 1 ]; then exec bash scripts/gpu_workflow.sh --dry-run "$OUT_DIR"; fi
    exec bash scripts/gpu_workflow.sh "$OUT_DIR"
    ;;
  *) echo "unknown part '$PART': kernels or workflow"; exit 64 ;;
esac
