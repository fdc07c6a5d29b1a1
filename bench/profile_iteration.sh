#!/bin/bash
# Profile iterations of a paper benchmark's run (auto-refine or class3d) on the device (after `paper_bench.sh run SET`
# built its data); torch mode starts each iteration's report with where the GPU waited (refine/device_idle.py):
#   bash bench/profile_iteration.sh SET ITERATIONS [MODE]     e.g. bench/profile_iteration.sh betagal 16,final
# ITERATIONS: CRYOREFINE_PROFILE's list; MODE: torch (default), python (cProfile) or waits (where the host waits for
# the device). Writes $OUT/profile-SET-*.txt and
# the run's log; the run goes to /tmp/prof/SET (not the benchmark's run folder).
# PROFILE_EXTRA: more options (e.g. "--iter 6" to stop a class3d run after its profiled iterations).
set -uo pipefail
set_=${1:?SET}; its=${2:?ITERATIONS}; mode=${3:-torch}
source bench/device_env.sh
read -r cmd ini flags < <(python3 -c "import sys; sys.path.insert(0, 'bench'); import paper_bench as b; s = b.SETS['$set_']; \
print('classify' if s.job == 'class3d' else 'refine', int(s.ini_high), ' '.join(s.flags))")
d=/tmp/cryobench/$set_/data
rm -rf /tmp/prof/$set_ && mkdir -p /tmp/prof/$set_
CRYOREFINE_PROFILE=$its CRYOREFINE_PROFILE_MODE=$mode CRYOREFINE_PROFILE_OUT=$out/profile-$set_-$mode.txt \
  timeout ${PROFILE_TIMEOUT:-240} python3 -m cryorefine.cli.main $cmd --i $d/particles_noposes.star --o /tmp/prof/$set_/run \
  --ref $d/init$ini.mrc $flags --gpu ${PROFILE_EXTRA:-} 2>&1 | grep -v "particles, .*/s" | tail -5
cp /tmp/prof/$set_/run.log $out/profile-$set_-run.log 2>/dev/null
ls $out/profile-$set_-* 
