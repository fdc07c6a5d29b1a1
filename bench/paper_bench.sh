#!/bin/bash
# One device call of the paper benchmarks (issue 5), from the repository root on the device machine:
#   bench/paper_bench.sh ACTION SET [BUDGET_S] [more bench/paper_bench.py options]      e.g. bench/paper_bench.sh run betagal 480
# ACTION: build | run | cpu | report; SET: betagal | trpv1 | trpv1_full | empiar10028 | tiny | tiny_class3d.
# Installs the carried wheels (.whl: mrcfile, starfile, ...) into /tmp/site once per machine, runs paper_bench.py with the
# result files in $OUT (else bench/results), data and runs in /tmp/cryobench (kept while the machine stays warm).
# A hard timeout (budget + 30 s) guards the call; if it fires (say an iteration much longer than the last), `report`
# writes what is on disk and the next `run` call continues from the last finished iteration.
set -uo pipefail
action=${1:?usage: bench/paper_bench.sh ACTION SET [BUDGET_S] [options]}; set_=${2:?SET}; budget=${3:-480}
shift $(( $# < 3 ? $# : 3 ))
source bench/device_env.sh
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null | head -1
df -h /tmp | tail -1
timeout -k 10 $(( ${budget%.*} + 30 )) python3 bench/paper_bench.py "$action" "$set_" --budget "$budget" --out "$out" "$@" 2>&1 \
  | grep --line-buffered -v "particles, .*/s, " | tee -a "$out/$set_-call.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -ne 0 ] && [ "$action" != build ]; then
  echo "paper_bench.py exited $rc; writing the report from what is on disk"
  timeout 45 python3 bench/paper_bench.py report "$set_" --out "$out" "$@" 2>&1 | tail -3
fi
exit "$rc"
