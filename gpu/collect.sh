#!/usr/bin/env bash
# Wait for a gpu_check.sh started in the background, then show and copy what it wrote so far.
#
# usage: collect.sh RESULTS_DIR [WAIT_S]
#
#   RESULTS_DIR   the OUT the background gpu_check.sh writes to (e.g. /tmp/gpu-res)
#   WAIT_S        wait at most this long for its summary.txt (default 0: look now)
#
# Prints the check's progress (the step lines and the last lines of gpu_check.log) and copies
# its result files into $OUT when that is set (a machine whose calls return only what they
# write to $OUT). Exit status: 0 once summary.txt exists (the check finished), 3 while it runs.
set -uo pipefail
RESULTS=${1:?usage: collect.sh RESULTS_DIR [WAIT_S]}
WAIT_S=${2:-0}

deadline=$(( $(date +%s) + WAIT_S ))
while [ ! -f "$RESULTS/summary.txt" ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done

log="$RESULTS/gpu_check.log"
if [ -f "$RESULTS/summary.txt" ]; then
  :  # printed below
elif [ -f "$log" ]; then
  echo "-- steps so far"; grep -E '^== |^[a-z_0-9]+: (ok|failed)' "$log"
  echo "-- last lines of $log"; tail -n 25 "$log"
else
  echo "no $log yet: did gpu_check.sh start with OUT=$RESULTS?"
fi
if [ -n "${OUT:-}" ] && [ -d "$RESULTS" ]; then
  # the logs and results only; the check writes nothing large
  find "$RESULTS" -maxdepth 1 -type f -size -8M -exec cp {} "$OUT"/ \;
  echo "-- copied to \$OUT: $(ls "$OUT" | tr '\n' ' ')"
fi
[ -f "$RESULTS/summary.txt" ] && { echo "-- finished"; cat "$RESULTS/summary.txt"; exit 0; }
echo "-- still running"
exit 3
