#!/bin/bash
# Auto-refine end to end on the GPU and on the CPU (same data, same flags): resolution and angular-error distributions.
# Run on the device machine from the repository root (wheels in .whl). Results: $OUT/refine_gpu_vs_cpu.json
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
D=/tmp/gvc; N=${N:-600}
python3 -m cryorefine.cli.main simulate --o $D --n $N --box 40 --angpix 4.8 --snr 0.2 --max_shift 6 --bfactor 100 --seed 7 > /dev/null
python3 - <<PY
import torch
from cryorefine.fourier.filters import low_pass_filter
from cryorefine.io.mrc import read_map, write_map
t, a = read_map("$D/truth.mrc")
write_map("$D/start.mrc", low_pass_filter(torch.from_numpy(t).double(), 30.0, a).float().numpy(), a)
PY
FLAGS="--i $D/particles_noposes.star --ref $D/start.mrc --ini_high 30 --particle_diameter 170 --ctf --flatten_solvent --zero_mask --healpix_order 2 --auto_local_healpix_order 4 --offset_range 3 --offset_step 1.5 --random_seed 1"
( time python3 -m cryorefine.cli.main refine $FLAGS --o $D/gpu/run --gpu ) > $OUT/gpu.txt 2>&1
( time python3 -m cryorefine.cli.main refine $FLAGS --o $D/cpu/run --j 16 ) > $OUT/cpu.txt 2>&1
python3 - <<PY > $OUT/refine_gpu_vs_cpu.json
import json, numpy as np, torch
from cryorefine.evaluation import pose_errors, read_poses, summarise_pose_errors, map_resolution
from cryorefine.io.mrc import read_map
from cryorefine.reconstruction.fsc import fsc_curve, resolution_angstrom
out = {"device": torch.cuda.get_device_name(0), "particles": $N}
truth = read_poses("$D/particles.star"); tmap = torch.from_numpy(read_map("$D/truth.mrc")[0])
errs = {}
for k in ("gpu", "cpu"):
    r = "$D/%s/run" % k
    e = pose_errors(read_poses(r + "_data.star"), truth); errs[k] = np.sort(e["angle_deg"])
    h1 = torch.from_numpy(read_map(r + "_half1_class001_unfil.mrc")[0]); h2 = torch.from_numpy(read_map(r + "_half2_class001_unfil.mrc")[0])
    m = torch.from_numpy(read_map(r + "_class001.mrc")[0])
    out[k] = {**summarise_pose_errors(e), "gold_standard_0.143_angst": resolution_angstrom(fsc_curve(h1, h2), 0.143, 40, 4.8),
              "gold_standard_shell": round(40 * 4.8 / resolution_angstrom(fsc_curve(h1, h2), 0.143, 40, 4.8)),
              "fsc_to_truth_0.5_angst": map_resolution(m, tmap, 4.8)["resolution_angst"][0.5],
              "iterations": len([l for l in open("$D/%s/run.log" % k) if " iter " in l])}
q = np.linspace(0, 1, 11)
out["angle_error_deciles_gpu"] = np.quantile(errs["gpu"], q).round(3).tolist()
out["angle_error_deciles_cpu"] = np.quantile(errs["cpu"], q).round(3).tolist()
for k in ("gpu", "cpu"):
    t = [l for l in open("$OUT/%s.txt" % k) if l.startswith("real")]
    out[k]["wall"] = t[-1].split()[-1] if t else None
print(json.dumps(out, indent=1))
PY
cat $OUT/refine_gpu_vs_cpu.json; grep -E "finished|error" $OUT/gpu.txt $OUT/cpu.txt | cut -c1-200
