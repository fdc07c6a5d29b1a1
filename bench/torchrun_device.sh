#!/bin/bash
# Auto-refine on one GPU: without torchrun, under torchrun with 1 rank (NCCL), and with 2 ranks sharing the GPU (gloo).
# usage (repository root): bench/torchrun_device.sh DATA_DIR OUT_DIR
#   DATA_DIR: particles.star and truth.mrc (cryorefine simulate's output; simulated there if missing)
# Writes OUT_DIR/torchrun_device.json (wall time, backend, resolution, batches per rank per iteration) and each run's log.
set -uo pipefail
DATA=$1; RES=$2; W=/tmp/torchrun_device
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
if ls .whl/*.whl > /dev/null 2>&1; then  # dependency wheels carried as in bench/gpu_session.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
rm -rf $W; mkdir -p $W $RES
[ -f $DATA/particles.star ] || python3 -m cryorefine.cli.main simulate --o $DATA --n ${N:-2000} --box 96 --angpix 2.0 --snr 0.05 --seed 7 > /dev/null
python3 -c "
import torch; from cryorefine.fourier.filters import low_pass_filter; from cryorefine.io.mrc import read_map, write_map
t, a = read_map('$DATA/truth.mrc'); write_map('$W/start.mrc', low_pass_filter(torch.from_numpy(t).double(), 30.0, a).float().numpy(), a)"
FLAGS="--i $DATA/particles_noposes.star --ref $W/start.mrc --ini_high 30 --particle_diameter ${DIAMETER:-160} --ctf --flatten_solvent --zero_mask
  --healpix_order 2 --auto_local_healpix_order 4 --offset_range 5 --offset_step 2 --random_seed 0 --iter ${ITER:-10} --gpu"
TORCHRUN="python3 -m torch.distributed.run --standalone --nproc_per_node"
refine() {  # name, launcher...: wall time and exit code to $W/walls.txt
  local name=$1; shift; local t0=$(date +%s.%N)
  timeout ${RUN_TIMEOUT:-180} "$@" refine $FLAGS --o $W/$name/run > $RES/$name.txt 2>&1
  echo "$name $? $(date +%s.%N) $t0" >> $W/walls.txt
}
refine plain python3 -m cryorefine.cli.main
refine nccl_1rank $TORCHRUN 1 -m cryorefine.cli.main
refine gloo_2ranks_shared_gpu $TORCHRUN 2 -m cryorefine.cli.main
python3 - > $RES/torchrun_device.json <<PY
import glob, json, re, torch
out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
for line in open("$W/walls.txt"):
    name, rc, t1, t0 = line.split()
    log = open("$W/%s/run.log" % name).read()
    states = sorted(glob.glob("$W/%s/run_it*_state.pt" % name))
    hist = torch.load(states[-1], weights_only=False)["history"] if states else []
    fin = re.findall(r"finished: (\{.*\})", log)
    out[name] = {"rc": int(rc), "wall_s": round(float(t1) - float(t0), 1), "backend": (re.findall(r"ranks \((\w+)\)", log) or ["none"])[0],
                 "final": json.loads(fin[-1]) if fin else None, "batches_per_rank": [h.get("batches_per_rank") for h in hist],
                 "seconds_per_iteration": [round(h["seconds"], 1) for h in hist]}
print(json.dumps(out, indent=1))
PY
cat $RES/torchrun_device.json; grep -h "error" $RES/*.txt | cut -c1-300
