#!/usr/bin/env bash
# The BISE workflow at GPU speed in one command (docs/workflow.md):
#   bash scripts/gpu_workflow.sh [OUT_DIR]            # GPU machine: the paper schedule, per-phase times
#   bash scripts/gpu_workflow.sh --dry-run [OUT_DIR]  # CPU: a tiny schedule that checks the wiring
# Runs `bise run --data biased-mnist:rho=0.997 --arch simple-cnn --device cuda` (80 vanilla, 100 mask,
# 50 head epochs per phase), writes OUT_DIR/workflow.json (per-phase seconds, the targets and whether
# they are met; scripts/workflow_report.py), then (GPU only) the no-sync test and the suite's
# workflow cases (OUT_DIR/<gpu>-<date>-<commit>.json). Every step has its own timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT="${1:-${OUT:-benchmarks/results/workflow}}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ]; then
  ARGS=(--data colored-digits --arch simple-cnn --width 0.25 --device cpu --vanilla-epochs 1 --mask-epochs 2
        --head-epochs 1 --latency-repeats 0)
else
  ARGS=(--data biased-mnist:rho=0.997 --arch simple-cnn --device cuda)
fi
start=$(date +%s.%N)
timeout "${WORKFLOW_TIMEOUT_S:-480}" "$PY" -m bise run "${ARGS[@]}" --out "$OUT/run" --overwrite --quiet
end=$(date +%s.%N)
"$PY" scripts/workflow_report.py "$OUT/run/report.json" --wall-seconds "$("$PY" -c "print($end - $start)")" \
  --out "$OUT/workflow.json"
if [ "$DRY" = 0 ]; then
  timeout 120 "$PY" -m pytest -q tests/bise/test_train_sync.py -k gpu || echo "no-sync test failed (rc $?)"
  timeout 240 "$PY" benchmarks/gpu_suite.py --filter workflow_ --out "$OUT" || echo "suite failed (rc $?)"
fi
