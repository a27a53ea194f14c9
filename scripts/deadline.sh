# Sourced by scripts/device_session.sh, benchmarks/run_gpu.sh and scripts/gpu_workflow.sh:
# `. scripts/deadline.sh DEFAULT_S`. DEADLINE_S (default DEFAULT_S, the sum of the script's step limits)
# counts from here. scripts/device_session.sh sources it first thing and exports what is left as
# DEADLINE_S before it hands over to the part's script, so the session file's imports, the wheel install
# and the build count against the one deadline of the call.
#   left        the whole seconds left before the deadline (0 once it has passed)
#   cap LIMIT   LIMIT, or the seconds left when fewer (at least 1): a step's timeout
#   expired     true once no second is left: skip the step
#   log TEXT    TEXT with the seconds since the start and the seconds left (a progress line)
DEADLINE_S=${DEADLINE_S:-$1}
deadline_start=$SECONDS
left() {
  local l=$((DEADLINE_S - (SECONDS - deadline_start)))
  echo $((l > 0 ? l : 0))
}
cap() {
  local l
  l=$(left)
  if [ "$l" -lt "$1" ]; then echo $((l > 1 ? l : 1)); else echo "$1"; fi
}
expired() { [ "$(left)" -le 0 ]; }
log() { echo "== [$(date -u +%H:%M:%S) +$((SECONDS - deadline_start)) s, $(left) s left] $*"; }
