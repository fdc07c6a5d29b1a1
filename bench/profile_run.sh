#!/bin/bash
# cProfile of a whole paper-benchmark run on the device, start-up and final writing included (profile_iteration.sh
# profiles chosen iterations only), after `paper_bench.sh run SET` built its data:
#   bash bench/profile_run.sh SET [MORE_OPTIONS]      e.g. bench/profile_run.sh trpv1
# Writes $OUT/run-SET.prof (pstats: `python -m pstats`) and the run's log; the run goes to /tmp/prof_run/SET.
set -uo pipefail
set_=${1:?SET}; shift
source bench/device_env.sh
read -r cmd ini flags < <(python3 -c "import sys; sys.path.insert(0, 'bench'); import paper_bench as b; s = b.SETS['$set_']; \
print('classify' if s.job == 'class3d' else 'refine', int(s.ini_high), ' '.join(s.flags))")
d=/tmp/cryobench/$set_/data
rm -rf /tmp/prof_run/$set_ && mkdir -p /tmp/prof_run/$set_
t0=$(date +%s.%N)
timeout ${PROFILE_TIMEOUT:-240} python3 -m cProfile -o $out/run-$set_.prof -m cryorefine.cli.main $cmd \
  --i $d/particles_noposes.star --o /tmp/prof_run/$set_/run --ref $d/init$ini.mrc $flags --gpu "$@" 2>&1 | grep -v "particles, .*/s" | tail -3
echo "profile_run: $set_ took $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s under cProfile"
cp /tmp/prof_run/$set_/run.log $out/run-$set_.log 2>/dev/null
