#!/bin/bash
# Scaling of auto-refine over GPUs of one host (issue 7), one device call, from the repository root (carry .whl):
#   bash bench/scaling.sh SET ["N1 N2 ..."] [more bench/scaling.py options]        e.g. bash bench/scaling.sh betagal "1 2"
# SET: betagal | trpv1 (the 5,000-particle subset) | tiny (test). GPU counts default to 1 2 4 8 up to the GPUs there are.
# Env: COMMIT (the commit to record; the device copy's git HEAD can be stale), SCALING_BUDGET (seconds of the python part,
# default 540), SCALING_MAX_SECONDS (--max_seconds of each run, default 200). Data and runs in /tmp/cryobench/SET.
# Writes $OUT/<date>-<device>-scaling-SET.md, .json, -logs.tgz, $OUT/scaling-SET-call.log and scaling-SET-gpu-util.csv
# (nvidia-smi's utilisation of each GPU once a second); prints a summary.
set -uo pipefail
set_=${1:?usage: bash bench/scaling.sh SET [\"1 2 4 8\"] [options]}; gpus=${2:-}
shift $(( $# < 2 ? $# : 2 ))
source bench/device_env.sh
budget=${SCALING_BUDGET:-540}
export SCALING_COMMAND="bash bench/scaling.sh $set_ \"$gpus\"${*:+ $*}"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
# each GPU's utilisation and memory once a second while the runs go (idle GPUs show where a rank waits)
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 1000 > "$out/scaling-$set_-gpu-util.csv" 2>/dev/null &
smi=$!
timeout -k 10 $(( ${budget%.*} + 40 )) python3 bench/scaling.py "$set_" ${gpus:+--gpus "$gpus"} --out "$out" --budget "$budget" "$@" 2>&1 \
  | grep --line-buffered -v "particles, .*/s, " | tee "$out/scaling-$set_-call.log"
rc=${PIPESTATUS[0]}
kill "$smi" 2>/dev/null
exit "$rc"
