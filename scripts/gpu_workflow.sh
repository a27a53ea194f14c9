#!/usr/bin/env bash
# The BISE workflow at GPU speed in one command (docs/workflow.md):
#   bash scripts/gpu_workflow.sh [OUT_DIR]            # GPU machine: the paper schedule, per-phase times
#   bash scripts/gpu_workflow.sh --dry-run [OUT_DIR]  # CPU: a tiny schedule that checks the wiring
# On a GPU, first the suite's workflow cases (OUT_DIR/<gpu>-<date>-<commit>.json: vanilla step, mask
# epoch, head phase, evaluation) and the no-sync test, then `bise run --data biased-mnist:rho=0.997
# --arch simple-cnn --device cuda` (80 vanilla, 100 mask, 50 head epochs per phase), which writes
# OUT_DIR/workflow.json (per-phase seconds, the targets and whether they are met;
# scripts/workflow_report.py) and OUT_DIR/run-report.json (the run's report.json); then, with the official
# code carried in .official/, OUT_DIR/official.json (its per-epoch cost beside ours). Every step has its own
# time limit, cut to what is left of DEADLINE_S. The run's own folder (checkpoints, models, plots: a dozen
# files) stays outside OUT_DIR, in $BISE_RUN_DIR (default: a new temporary folder): the device
# tool brings back at most 8 files from $OUT, and the measurements must be among them.
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
. scripts/deadline.sh 960  # cap LIMIT: a step's time limit within DEADLINE_S
if [ "$DRY" = 0 ]; then
  # The per-unit costs and the no-sync check first: a full run cut by the deadline still leaves them.
  timeout "$(cap 150)" "$PY" benchmarks/gpu_suite.py --filter workflow_ --out "$OUT" --budget-s 90 \
    || echo "suite failed (rc $?)"
  timeout "$(cap 90)" "$PY" -m pytest -q tests/bise/test_train_sync.py -k gpu || echo "no-sync test failed (rc $?)"
fi
RUN_DIR="${BISE_RUN_DIR:-$(mktemp -d)/run}"
start=$(date +%s.%N)
limit=$(cap "${WORKFLOW_TIMEOUT_S:-600}")
if ! timeout "$limit" "$PY" -m bise run "${ARGS[@]}" --out "$RUN_DIR" --overwrite --quiet; then
  echo "bise run did not finish within ${limit} s (rc $?): no workflow.json"; exit 5
fi
end=$(date +%s.%N)
cp "$RUN_DIR/report.json" "$OUT/run-report.json"
"$PY" scripts/workflow_report.py "$RUN_DIR/report.json" --wall-seconds "$("$PY" -c "print($end - $start)")" \
  --out "$OUT/workflow.json"
# Optional, in what is left of the deadline: the official BISE code's per-epoch cost beside ours on this
# device (benchmarks/bench_official.py), when its files are carried in .official/ (git-ignored; they are
# not part of this project: docs/workflow.md says how to make the folder). Skipped without it.
OFFICIAL_DIR="${BISE_OFFICIAL_DIR:-$PWD/.official}"
if [ -d "$OFFICIAL_DIR/src" ]; then
  if [ "$DRY" = 1 ]; then OARGS=(--dry-run); else OARGS=(--device cuda --rounds 3); fi
  timeout "$(cap 120)" "$PY" benchmarks/bench_official.py --official-dir "$OFFICIAL_DIR" "${OARGS[@]}" \
    --out "$OUT/official.json" >/dev/null || echo "official comparison failed or cut by the deadline (rc $?)"
else
  echo "no official code in $OFFICIAL_DIR: its per-epoch cost is not measured"
fi
