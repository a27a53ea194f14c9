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
# tool brings back at most 8 files from $OUT, and the measurements must be among them. On a GPU the
# no-sync test's output goes to OUT_DIR/nosync.log. A `bise run` cut by its time limit (or failing)
# leaves OUT_DIR/run.json (the run's manifest: each finished step's seconds) and OUT_DIR/run-progress.json
# (its exit status, the time limit, the seconds each file of the run folder appeared after the start,
# and the extraction checkpoint's epoch and per-phase seconds; "started": false where no time was left to
# start it), and the script exits with status 5.
# A dry run without OUT_DIR writes into a new temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
if [ "$DRY" = 1 ]; then OUT="${1:-${OUT:-$(mktemp -d -t gpu-workflow-XXXXXX)}}"; else OUT="${1:-${OUT:-benchmarks/results/workflow}}"; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if [ "$DRY" = 1 ]; then
  ARGS=(--data colored-digits --arch simple-cnn --width 0.25 --device cpu --vanilla-epochs 1 --mask-epochs 2
        --head-epochs 1 --latency-repeats 0)
else
  ARGS=(--data biased-mnist:rho=0.997 --arch simple-cnn --device cuda)
fi
. scripts/deadline.sh 960  # cap LIMIT: a step's time limit within DEADLINE_S
RESERVE_S=${RESERVE_S:-20}  # kept from the run's limit for what follows it (its report, or what a cut run left)
if [ "$DRY" = 0 ]; then
  # The per-unit costs and the no-sync check first: a full run cut by the deadline still leaves them.
  # ^workflow_: only the workflow module's cases are built (the others would allocate GBs for nothing).
  if expired; then log "no time left for the suite's workflow cases"; else
    log "the suite's workflow cases"
    rc=0; timeout "$(cap 150)" "$PY" benchmarks/gpu_suite.py --filter ^workflow_ --out "$OUT" --budget-s 90 || rc=$?
    [ "$rc" = 0 ] || echo "suite failed (rc $rc)"
  fi
  if expired; then log "no time left for the no-sync test"; else
    log "the no-sync test (output: nosync.log)"
    rc=0; timeout "$(cap 90)" "$PY" -m pytest -v -rA tests/bise/test_train_sync.py -k gpu >"$OUT/nosync.log" 2>&1 || rc=$?
    tail -3 "$OUT/nosync.log"
    if [ "$rc" = 0 ]; then echo "no-sync test passed"; else echo "no-sync test failed (rc $rc)" | tee -a "$OUT/nosync.log"; fi
  fi
fi
RUN_DIR="${BISE_RUN_DIR:-$(mktemp -d)/run}"
start=$(date +%s.%N)
l=$(($(left) - RESERVE_S))
limit=$(cap "${WORKFLOW_TIMEOUT_S:-600}")
[ "$l" -ge "$limit" ] || limit=$((l > 1 ? l : 1))
rc=0
started=1
if [ "$(left)" -le "$RESERVE_S" ]; then
  rc=124 started=0 limit=0; log "no time left for bise run: not started"
else
  log "bise run (limit ${limit} s; the run's folder: $RUN_DIR)"
  timeout "$limit" "$PY" -m bise run "${ARGS[@]}" --out "$RUN_DIR" --overwrite --quiet || rc=$?
fi
end=$(date +%s.%N)
if [ "$rc" != 0 ]; then
  if [ "$started" = 0 ]; then why="did not start (at most RESERVE_S = ${RESERVE_S} s were left)"
  elif [ "$rc" = 124 ]; then why="was cut by its time limit of ${limit} s"; else why="failed (rc $rc)"; fi
  log "bise run $why: no workflow.json; run-progress.json says what there is"
  [ ! -f "$RUN_DIR/run.json" ] || cp "$RUN_DIR/run.json" "$OUT/run.json"
  timeout 30 "$PY" - "$RUN_DIR" "$OUT/run-progress.json" "$rc" "$limit" "$start" "$end" "$started" <<'EOF' || echo "no run-progress.json"
import json, sys
from pathlib import Path

run_dir, out, rc, limit, start, end = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \
    float(sys.argv[5]), float(sys.argv[6])
started = sys.argv[7] == "1"
progress = {"started": started, "rc": rc if started else None, "cut_by_time_limit": started and rc == 124,
            "limit_s": limit, "elapsed_s": round(end - start, 1),
            "files_s": {p.name: round(p.stat().st_mtime - start, 1) for p in sorted(run_dir.glob("*")) if p.is_file()}}
manifest = run_dir / "run.json"
if manifest.is_file():
    try:
        progress["steps_s"] = {name: entry.get("seconds") for name, entry in
                               json.loads(manifest.read_text()).get("artefacts", {}).items()}
    except (ValueError, AttributeError) as exc:
        progress["steps_s"] = f"unreadable run.json: {exc}"
checkpoint = run_dir / "checkpoint.pt"
if checkpoint.is_file():
    try:
        import torch

        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        progress["checkpoint"] = {"epoch": ckpt.get("epoch"), "done": ckpt.get("done"),
                                  "mask_epochs": (ckpt.get("config") or {}).get("mask_epochs"),
                                  "timing_s": ckpt.get("timing"), "history_epochs": len(ckpt.get("history") or [])}
    except Exception as exc:  # noqa: BLE001 - a checkpoint being written when the run was cut
        progress["checkpoint"] = {"error": f"{type(exc).__name__}: {exc}"}
out.write_text(json.dumps(progress, indent=1) + "\n")
print(json.dumps(progress))
EOF
  exit 5
fi
log "bise run done"
cp "$RUN_DIR/report.json" "$OUT/run-report.json"
"$PY" scripts/workflow_report.py "$RUN_DIR/report.json" --wall-seconds "$("$PY" -c "print($end - $start)")" \
  --out "$OUT/workflow.json"
# Optional, in what is left of the deadline: the official BISE code's per-epoch cost beside ours on this
# device (benchmarks/bench_official.py), when its files are carried in .official/ (git-ignored; they are
# not part of this project: docs/workflow.md says how to make the folder). Skipped without it.
OFFICIAL_DIR="${BISE_OFFICIAL_DIR:-$PWD/.official}"
if [ -d "$OFFICIAL_DIR/src" ]; then
  if [ "$DRY" = 1 ]; then OARGS=(--dry-run); else OARGS=(--device cuda --rounds 3); fi
  if expired; then log "no time left for the official comparison"; else
    log "the official code's per-epoch cost"
    rc=0; timeout "$(cap 120)" "$PY" benchmarks/bench_official.py --official-dir "$OFFICIAL_DIR" "${OARGS[@]}" \
      --out "$OUT/official.json" >/dev/null || rc=$?
    [ "$rc" = 0 ] || echo "official comparison failed or cut by the deadline (rc $rc)"
  fi
else
  echo "no official code in $OFFICIAL_DIR: its per-epoch cost is not measured"
fi
log "done"
