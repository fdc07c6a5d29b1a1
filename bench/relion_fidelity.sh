#!/bin/bash
# RELION 3.1.3 auto-refine on one set made by bench/fidelity_sets.py (the side-by-side fidelity comparison):
#   bash bench/relion_fidelity.sh SETDIR [SEED]
# Reads ini_high, sym and particle_diameter from SETDIR/set.json; runs from inside SETDIR (the STAR's image names,
# 000001@particles.mrcs, are relative to RELION's working directory). Output SETDIR/relion/run_*, stdout+stderr in
# SETDIR/relion/relion.log, wall time (s), exit status and the command in SETDIR/relion/time.txt. A SEED other than 0
# (relion_refine's --random_seed: the perturbation of the sampling grids) writes to SETDIR/relion_seedSEED/ instead,
# to measure RELION's own run-to-run scatter.
# The input STAR carries rlnRandomSubset, which relion_refine keeps with --split_random_halves (Experiment::read /
# divideParticlesInRandomHalves: only all-zero subsets are redrawn), so RELION refines the same half sets as ours.
set -uo pipefail
setdir=${1:?usage: bench/relion_fidelity.sh SETDIR [SEED]}
seed=${2:-0}
out=relion; [ "$seed" = 0 ] || out=relion_seed$seed
setdir=$(cd "$setdir" && pwd) || exit 2
[ -f "$setdir/set.json" ] || { echo "no $setdir/set.json" >&2; exit 2; }
read -r ini_high sym diameter < <(python3 -c "import json, sys; m = json.load(open(sys.argv[1])); print(m['ini_high'], m['sym'], m['particle_diameter'])" "$setdir/set.json")
cd "$setdir" && mkdir -p "$out"
cmd=(mpirun --allow-run-as-root --oversubscribe -n 3 relion_refine_mpi --o "$setdir/$out/run" --i "$setdir/particles.star"
     --ref "$setdir/start.mrc" --ini_high "$ini_high" --auto_refine --split_random_halves --particle_diameter "$diameter"
     --sym "$sym" --healpix_order 2 --auto_local_healpix_order 3 --offset_range 5 --offset_step 2 --low_resol_join_halves 40
     --norm --scale --flatten_solvent --zero_mask --ctf --ctf_corrected_ref --pad 2 --random_seed "$seed" --j 1
     --dont_combine_weights_via_disc --pool 30)
echo "$(date -Is) start: ${cmd[*]}" > "$out/relion.log"
start=$(date +%s)
"${cmd[@]}" >> "$out/relion.log" 2>&1
rc=$?
end=$(date +%s)
{
  echo "wall_s $((end - start))"
  echo "rc $rc"
  echo "start $(date -d @"$start" -Is)"
  echo "end $(date -d @"$end" -Is)"
  echo "host_cores $(nproc)"
  echo "cmd ${cmd[*]}"
} > "$out/time.txt"
echo "$(date -Is) $setdir: rc $rc, wall $((end - start)) s"
exit $rc
