#!/bin/bash
# Issue 23's measurement in one device call (carry .whl and .relion5): RELION-5 built if this machine has no build
# yet (bench/relion5/build.sh, ~2 minutes on 16 cores), our run of SET (bench/paper_bench.sh run), RELION-5 on the
# same particles, start map and flags (bench/relion5/run.py), then the report quoting both ($OUT, else bench/results).
# One call, because a machine left idle between calls goes back, and RELION's build with it.
#   usage: bash bench/relion5/compare.sh SET [OUR_BUDGET_S=150] [RELION_BUDGET_S=390]
#   OUR_BUDGET_S covers the data build, our run and paper_bench's report reserve (45 s): our run gets --max_seconds of
#   what is left (betagal with 80 got 20 s and stopped after 11 of 14 iterations; 110 gave TRPV1-like 5k its 44 s).
#   e.g.   bash bench/relion5/compare.sh empiar10028 150 240   (class3d: RELION's time per iteration from a partial run)
#   env:   RELION5_RUN_ARGS: more run.py options (e.g. "--no_gpu --threads 1" with RELION5_BIN=/usr/bin on a CPU)
set -uo pipefail
set_=${1:?usage: compare.sh SET [OUR_BUDGET_S] [RELION_BUDGET_S]}; ours=${2:-150}; theirs=${3:-390}
source bench/device_env.sh
bash bench/relion5/build.sh > "$out/relion5-build.log" 2>&1 || { tail -20 "$out/relion5-build.log"; exit 1; }
# our run made in this call, beside RELION's: paper_bench keeps a finished run of an earlier call on this machine
rm -rf "${BENCH_WORKDIR:-/tmp/cryobench}/$set_/run"
bash bench/paper_bench.sh run "$set_" "$ours" --cpu_n 0 | grep -E "finished|call took|Error|error" | tail -5
timeout -k 10 $(( ${theirs%.*} + 60 )) python3 bench/relion5/run.py "$set_" --budget "$theirs" ${RELION5_RUN_ARGS:-} 2>&1 | tail -3
cp "${BENCH_WORKDIR:-/tmp/cryobench}/$set_/relion5/relion.log" "$out/$set_-relion5.log" 2>/dev/null
timeout 90 python3 bench/paper_bench.py report "$set_" --out "$out" 2>&1 | tail -1
