#!/bin/bash
# RELION 3.1.3 class3d beside ours on a mixture folder made by bench/classify_mixture.py (issue 4), this 2-core machine:
#   bash bench/relion_class3d.sh DIR [more relion_refine flags]     HP (healpix order, 2), STRICT (Å, 0), DIAMETER (Å, 170)
# Same flags as classify_mixture.py's run of ours; output DIR/relion/run_it0NN_*, wall time on the last line.
set -uo pipefail
d=${1:?usage: bench/relion_class3d.sh DIR [flags]}; shift
cd "$d" && mkdir -p relion
start=$(date +%s)
nice -n 10 mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi \
  --i particles_in.star --o relion/run --ref start.mrc --K 3 --iter 25 --tau2_fudge 4 --ini_high 40 --particle_diameter "${DIAMETER:-170}" \
  --sym C1 --healpix_order "${HP:-2}" --offset_range 5 --offset_step 2 --ctf --ctf_corrected_ref --flatten_solvent --zero_mask \
  --strict_highres_exp "${STRICT:-0}" --random_seed 0 --j 1 --pool 30 --dont_combine_weights_via_disc "$@"
echo "wall_s $(( $(date +%s) - start ))"
