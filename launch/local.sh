#!/usr/bin/env bash
# Run N processes of one command on this machine as one multi-process JAX job, CPU backend.
# For testing multi-host code paths without a cluster: each process gets its own process id, the same
# coordinator on a free localhost port, and DEVICES simulated CPU devices (cross-process collectives: gloo).
#
#   launch/local.sh 2 star-jax train --config configs/star.py:tiny --stage stage2 --workdir /tmp/two
#   DEVICES=4 launch/local.sh 2 python my_script.py
#
# The processes read STAR_COORDINATOR / STAR_NUM_PROCESSES / STAR_PROCESS_ID in
# star_jax.distributed.initialize(). Output lines are prefixed with the process id. If one process
# fails the others are stopped; the exit status is the first failure's (0 when all succeed).
set -euo pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: [DEVICES=2] $0 NUM_PROCESSES COMMAND [ARGS...]" >&2
  exit 2
fi
num_processes=$1
shift
PYTHON=${PYTHON:-python3}
port=$("$PYTHON" -c 'import portpicker; print(portpicker.pick_unused_port())' 2>/dev/null ||
       "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')

set -m  # each process (with its output filter) in its own process group, so a stop reaches all of it
pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    export STAR_COORDINATOR="localhost:$port" STAR_NUM_PROCESSES="$num_processes" STAR_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="${DEVICES:-2}"
    "$@" 2>&1 | sed -u "s/^/[$i] /"
  ) &
  pids+=($!)
done
set +m  # groups are made; without job control bash does not print "Terminated" notices

status=0
alive=("${pids[@]}")
while ((${#alive[@]} > 0)); do
  running=()
  for pid in "${alive[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then running+=("$pid"); continue; fi
    code=0
    wait "$pid" || code=$?
    if ((code != 0 && status == 0)); then
      status=$code
      echo "local.sh: a process exited with status $code; stopping the others" >&2
      stop_all
    fi
  done
  alive=("${running[@]}")
  if ((${#alive[@]} > 0)); then sleep 0.2; fi
done
exit "$status"
