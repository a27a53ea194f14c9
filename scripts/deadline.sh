# Sourced by benchmarks/run_gpu.sh and scripts/gpu_workflow.sh: `. scripts/deadline.sh DEFAULT_S`.
# DEADLINE_S (default DEFAULT_S, the sum of the script's step limits) counts from here; `cap LIMIT`
# prints LIMIT, or the seconds left before the deadline when fewer (at least 1): a step's timeout.
DEADLINE_S=${DEADLINE_S:-$1}
deadline_start=$SECONDS
cap() {
  local left=$((DEADLINE_S - (SECONDS - deadline_start)))
  if [ "$left" -lt "$1" ]; then echo $((left > 1 ? left : 1)); else echo "$1"; fi
}
