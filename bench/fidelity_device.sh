#!/bin/bash
# One device call of the fidelity comparison: build the sets of bench/fidelity_sets.py on the device's CPU (the same
# data RELION 3.1.3 refined where it ran: fingerprints checked against bench/results/fidelity-sets-fingerprints.json)
# and refine each with cryorefine (bench/fidelity_ours.py) on the GPU, or on the CPU with DEVICE=cpu.
# $OUT/fidelity-<label>.tar.xz holds every set's judgement (.json), log and STAR files (the 8-file limit of a call).
#   bash bench/fidelity_device.sh [SETS] [LABEL]      (default: "tightbox sym prefori bigbox" ours)
# SEED=N in the environment passes --random_seed N (default 0, as bench/relion_fidelity.sh).
set -uo pipefail
source bench/device_env.sh
export FIDELITY_PDB_DIR=${FIDELITY_PDB_DIR:-$PWD/.fidpdb}  # the models, carried (../shared does not travel)
sets=${1:-"tightbox sym prefori bigbox"}
label=${2:-ours}
how="--gpu"
[ "${DEVICE:-gpu}" = cpu ] && how="--j $(nproc)"
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'
echo "$(date -Is)"
work=/tmp/fidout/$label
mkdir -p $work
missing=$(for s in $sets; do [ -f /tmp/fid/$s/set.json ] || echo $s; done | tr '\n' ',')
if [ -n "$missing" ]; then
  python3 bench/fidelity_sets.py /tmp/fid --sets "$missing" > "$work/sets.log" 2>&1 || { cat "$work/sets.log"; exit 1; }
fi
for s in $sets; do
  rm -rf /tmp/fid/$s/$label
  timeout ${SET_TIMEOUT:-420} python3 bench/fidelity_ours.py /tmp/fid/$s "$work" $how --label $label --seed "${SEED:-0}" --check bench/results/fidelity-sets-fingerprints.json > "$work/$s-$label.log" 2>&1
  echo "$s rc $?: $(tail -1 "$work/$s-$label.log")"
done
tar cJf "$out/fidelity-$label.tar.xz" -C $work .
