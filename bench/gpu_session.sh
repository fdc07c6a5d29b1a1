#!/bin/bash
# One device call: GPU tests, E-step CPU/GPU parity, the 6msm auto-refine, the 3-state classification. Results under $OUT.
# usage: bash bench/gpu_session.sh [tests] [parity] [refine] [citest] [classify] [classparity]   (none: all)
# Run from the repository root on the device machine with .whl and gpudata carried.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/device.txt
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee -a $OUT/device.txt
git log -1 --format='%H %cd' >> $OUT/device.txt 2>/dev/null || true
steps=" ${*:-all} "
has() { [[ $steps == *" all "* || $steps == *" $1 "* ]]; }
if has tests; then
  timeout 120 python3 -m pytest -q -m gpu tests 2>&1 | tail -15 | tee $OUT/gpu_tests.txt
fi
if has parity; then
  timeout 200 python3 bench/estep_parity.py gpudata/sim6msm/particles.star gpudata/sim6msm/truth.mrc 160 256 20 > $OUT/estep_parity.json 2> $OUT/estep_parity.err; tail -3 $OUT/estep_parity.err; cat $OUT/estep_parity.json
fi
if has refine; then
  # the 6msm set without its true poses (particles_in.star), same flags as bench/data/sim6msm/run_relion_hp3.sh
  cd gpudata/sim6msm
  R=gpu_hp${LOCAL_ORDER:-3}
  start=$(date +%s.%N)
  timeout ${REFINE_TIMEOUT:-420} python3 -m cryorefine.cli.main refine --i particles_in.star --o $R/run --ref init30.mrc --ini_high 30 --particle_diameter 160 \
    --healpix_order 2 --auto_local_healpix_order ${LOCAL_ORDER:-3} --offset_range 5 --offset_step 2 --low_resol_join_halves 40 --ctf --flatten_solvent --zero_mask --norm --scale --pad 2 \
    --random_seed 0 --gpu 2>&1 | grep -v "particles, .*/s" | tail -40 > $OUT/refine_stdout.txt
  python3 -c "import time; print('wall_s', round(time.time() - $start, 1))" >> $OUT/refine_stdout.txt
  tar czf $OUT/refine.tgz -C $R run.log run_data.star run_half1_class001_unfil.mrc run_half2_class001_unfil.mrc run_class001.mrc run_model.star report.html 2>/dev/null
  cd ../..
fi
if has citest; then
  CUDA_VISIBLE_DEVICES= timeout ${CITEST_TIMEOUT:-240} python3 -m pytest -x -q ${CITESTS:-tests/refine} 2>&1 | tail -15 > $OUT/citest.txt; cat $OUT/citest.txt
fi
if has classify; then
  # the 3-state mixture (box 64, 3 Å/px) carried in gpudata/mix64, classified from the STAR file without true poses
  # CLASSIFY_NAME / CLASSIFY_HP / CLASSIFY_EXTRA (e.g. "--strict_highres_exp 10") choose the run; CLASSIFY_DATA /
  # CLASSIFY_BOX / CLASSIFY_ANGPIX another mixture folder (bench/data/mix48r copied to gpudata/)
  M=${CLASSIFY_DATA:-gpudata/mix64}; N=${CLASSIFY_NAME:-ours}
  timeout ${CLASSIFY_TIMEOUT:-300} python3 bench/classify_mixture.py $M 3000 ${CLASSIFY_BOX:-64} ${CLASSIFY_ANGPIX:-3.0} --gpu --iter ${CLASSIFY_ITER:-25} --diameter 170 --input particles_in.star \
    --name $N --healpix_order ${CLASSIFY_HP:-2} --extra "${CLASSIFY_EXTRA:-}" > $OUT/classify_$N.json 2> $OUT/classify_err_$N.txt
  tail -3 $OUT/classify_err_$N.txt; cat $OUT/classify_$N.json
  tar czf $OUT/classify_$N.tgz -C $M $N/run.log $(cd $M && ls $N/run_it0*_model.star $N/run_it025_data.star $N/run_it025_class00*.mrc 2>/dev/null) 2>/dev/null
fi
if has classparity; then
  # one 3-class E-step from the same state (the classification's last maps) on CPU and GPU
  M=${CLASSIFY_DATA:-gpudata/mix64}
  timeout 300 python3 bench/estep_parity.py $M/particles_in.star $M/${CLASSIFY_NAME:-ours}/run_it025_class001.mrc,$M/${CLASSIFY_NAME:-ours}/run_it025_class002.mrc,$M/${CLASSIFY_NAME:-ours}/run_it025_class003.mrc 170 ${PARITY_N:-512} 20 \
    > $OUT/class_parity.json 2> $OUT/class_parity.err; tail -3 $OUT/class_parity.err; cat $OUT/class_parity.json
fi
ls -la $OUT
