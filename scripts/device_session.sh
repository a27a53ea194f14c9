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
# OUT defaults to $OUT (the device tool's folder that comes back), else benchmarks/results (a dry run: a
# new temporary folder). DEADLINE_S counts from this script's start (the imports, the wheel install and
# the workflow's fallback build included); each step gets what is left of it (its own cap below it), so
# the call ends before the tool's limit and every JSON written so far comes back. The call's output
# (the part's script too) is also kept in OUT/session-<part>.txt, with a timed line per step. The workflow needs what the device has no registry for:
# carry `.data` (BiasedMNIST's digits) and `.whl` (the torch-pruning wheel: `pip download --no-deps
# torch-pruning==1.6.1 -d .whl` here first); docs/gpu_suite.md gives the exact `run` calls. Optional:
# carry `.official` (the official BISE code's files, a real folder, not a link; docs/workflow.md) and the
# workflow part ends by timing its per-epoch cost beside ours in what is left of DEADLINE_S.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PART="${1:?usage: device_session.sh [--dry-run] kernels|workflow [OUT]}"
# A dry run without OUT writes into a new temporary folder: never into benchmarks/results, where its
# cpu-dry-run JSON would join the committed results.
if [ "$DRY" = 1 ]; then OUT_DIR="${2:-${OUT:-$(mktemp -d -t "device-session-$PART-XXXXXX")}}"
else OUT_DIR="${2:-${OUT:-benchmarks/results}}"; fi
mkdir -p "$OUT_DIR"
# The clock starts here: the imports below, the wheel install and the build count against DEADLINE_S
# too; the part's script gets what is left of it (exported as DEADLINE_S).
DEADLINE_S="${DEADLINE_S:-$([ "$PART" = workflow ] && echo 270 || echo 450)}"
. scripts/deadline.sh "$DEADLINE_S"
export BISE_DATA_DIR="${BISE_DATA_DIR:-$PWD/.data}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Everything this call prints (the part's script included) also lands in session-<part>.txt, the
# call's progress log: what a cut call did, and when, comes back with $OUT.
exec > >(tee -a "$OUT_DIR/session-$PART.txt") 2>&1
tee_pid=$!
# At the end the log is complete before the call returns: close the pipe and wait for tee (the part's
# script runs as a child, not exec'd, so that this runs after it).
finish() { local rc=$?; exec >&- 2>&-; wait "$tee_pid" 2>/dev/null; exit "$rc"; }
trap finish EXIT
# The part's script as a child that a SIGTERM / SIGINT to this script reaches too (with exec it was this
# process; a plain child was orphaned, still running and writing after the call had returned).
run_part() {
  # The trap is set before the fork: a signal between the fork and `child=$!` is kept (pending) and
  # forwarded once the child's pid is known (set after the fork, such a signal ended the shell alone).
  local child="" pending=0 rc
  trap 'if [ -n "$child" ]; then kill -TERM "$child" 2>/dev/null; else pending=1; fi' TERM INT
  "$@" &
  child=$!
  [ "$pending" = 0 ] || kill -TERM "$child" 2>/dev/null
  wait "$child"; rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$child" 2>/dev/null; then wait "$child"; rc=$?; fi  # interrupted: let it end
  exit "$rc"
}
echo "part=$PART dry=$DRY deadline_s=$DEADLINE_S commit=${BISE_COMMIT:-$(git rev-parse --short=8 HEAD 2>/dev/null)} out=$OUT_DIR"
date -u
timeout "$(cap 20)" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
timeout "$(cap 60)" python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1
handover() {  # what is left of the deadline, for the part's script
  if expired; then log "no time left for the $PART part"; exit 6; fi
  DEADLINE_S=$(left) deadline_start=$SECONDS; export DEADLINE_S
  log "$*"
}

case "$PART" in
  kernels)
    if [ "$DRY" = 1 ]; then
      handover "the suite's dry run"
      run_part python3 benchmarks/gpu_suite.py --dry-run --out "$OUT_DIR" --budget-s "$DEADLINE_S"
    fi
    handover "benchmarks/run_gpu.sh"
    TESTS_S=${TESTS_S:-120} run_part bash benchmarks/run_gpu.sh "$OUT_DIR"
    ;;
  workflow)
    if ! timeout "$(cap 60)" python3 -c "import torch_pruning" 2>/dev/null; then
      wheel=$(ls .whl/torch_pruning-*.whl 2>/dev/null | head -1)
      if [ -z "$wheel" ]; then echo "no torch_pruning and no .whl/torch_pruning-*.whl to install it from"; exit 4; fi
      timeout "$(cap 120)" python3 -m pip install -q --no-index --no-deps "$wheel" || exit 4
    fi
    if [ "$DRY" = 0 ] && ! timeout "$(cap 60)" python3 -c "import sys, bise_kernels._C as c; sys.exit(not getattr(c, 'WITH_CUDA', False))" 2>/dev/null; then
      log "build (no CUDA extension from the kernels call)"
      rc=0
      BISE_KERNELS_BUILD_CUDA=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
        MAX_JOBS=${MAX_JOBS:-16} timeout "$(cap 120)" python3 setup.py build_ext --inplace >"$OUT_DIR/build-workflow.log" 2>&1 \
        || rc=$?
      [ "$rc" = 0 ] || echo "build failed (rc $rc): the workflow runs on the reference kernels"
    fi
    if [ "$DRY" = 1 ]; then handover "scripts/gpu_workflow.sh --dry-run"; run_part bash scripts/gpu_workflow.sh --dry-run "$OUT_DIR"; fi
    handover "scripts/gpu_workflow.sh"
    run_part bash scripts/gpu_workflow.sh "$OUT_DIR"
    ;;
  *) echo "unknown part '$PART': kernels or workflow"; exit 64 ;;
esac
