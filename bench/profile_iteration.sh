#!/bin/bash
# Profile iterations of a paper benchmark's auto-refine on the device (after `paper_bench.sh run SET` built its data):
#   bash bench/profile_iteration.sh SET ITERATIONS [MODE]     e.g. bench/profile_iteration.sh betagal 16,final
# ITERATIONS: CRYOREFINE_PROFILE's list; MODE: torch (default) or python (cProfile). Writes $OUT/profile-SET-*.txt and
# the run's log; the run goes to /tmp/prof/SET (not the benchmark's run folder).
set -uo pipefail
set_=${1:?SET}; its=${2:?ITERATIONS}; mode=${3:-torch}
source bench/device_env.sh
flags=$(python3 -c "import sys; sys.path.insert(0, 'bench'); import paper_bench as b; print(' '.join(b.SETS['$set_'].flags))")
d=/tmp/cryobench/$set_/data
rm -rf /tmp/prof/$set_ && mkdir -p /tmp/prof/$set_
CRYOREFINE_PROFILE=$its CRYOREFINE_PROFILE_MODE=$mode CRYOREFINE_PROFILE_OUT=$out/profile-$set_-$mode.txt \
  timeout ${PROFILE_TIMEOUT:-240} python3 -m cryorefine.cli.main refine --i $d/particles_noposes.star --o /tmp/prof/$set_/run \
  --ref $d/init40.mrc $flags --gpu 2>&1 | grep -v "particles, .*/s" | tail -5
cp /tmp/prof/$set_/run.log $out/profile-$set_-run.log 2>/dev/null
ls $out/profile-$set_-* 
