#!/bin/bash
# RELION 3.1.3 class3d on the 3-state mixture (issue 4 side-by-side), 2-core machine; same flags as bench/classify_mixture.py.
cd "$(dirname "$0")"
mkdir -p relion
start=$(date +%s)
nice -n 10 mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi \
  --i particles_in.star --o relion/run --ref start.mrc --K 3 --iter 25 --tau2_fudge 4 --ini_high 40 --particle_diameter 170 \
  --sym C1 --healpix_order "${HP:-2}" --offset_range 5 --offset_step 2 --ctf --ctf_corrected_ref --flatten_solvent --zero_mask \
  --strict_highres_exp "${STRICT:-0}" --random_seed 0 --j 1 --pool 30 --dont_combine_weights_via_disc "$@"
echo "wall_s $(( $(date +%s) - start ))"
