#!/bin/bash
# The fused local kernel's block shapes on local searches' real shapes (bench/local_kernel.py), one device call: T = 9,
# the E-step's shell-ordered pixels, the candidates of a HEALPix local search (PoseGrid.local_candidates, σ the next
# order's step, ~22 per particle). Box 256 at the radius of the TRPV1-like full set's last iterations (115 px), order 7
# (and 5), with and without each particle's valid count, and raster pixels for comparison; box 100 at betagal-like's
# local window (44 px), order 3. JSON per case under $OUT (else bench/results), one summary line per shape.
#   bash bench/local_kernel_sweeps.sh [N_PARTICLES=2048] [TIMEOUT_PER_CASE_S=150] [CASES (names, default all)]
set -uo pipefail
n=${1:-2048}; limit=${2:-150}; only=${3:-}
source bench/device_env.sh
cases=(  # name|box|radius|flags|sweep (candidates;pixels;warps)
  "o7-shell-counts|256|115|--candidates local:7 --pixels shell --counts|8,16,32;16,32,64;2,4,8"
  "o7-shell-all|256|115|--candidates local:7 --pixels shell|16;32;4"
  "o7-raster-counts|256|115|--candidates local:7 --pixels raster --counts|16,32;32;4"
  "o5-shell-counts|256|115|--candidates local:5 --pixels shell --counts|8,16,32;32,64;4,8"
  "b100-o3-shell-counts|100|44|--candidates local:3 --pixels shell --counts|16,32;16,32,64;2,4,8"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name box radius flags sweep <<< "$c"
  [ -n "$only" ] && [[ " $only " != *" $name "* ]] && continue
  # shellcheck disable=SC2086
  timeout "$limit" python3 bench/local_kernel.py "$out/local-kernel-$name.json" --n "$n" --box "$box" --radius "$radius" \
    --TL 9x1 $flags --sweep "$sweep" 2>&1 | grep -E '^\{|failed' | python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        print(line.rstrip()); continue
    r = json.loads(line)
    print(sys.argv[1], "L=%d" % r["L"], "%dx%d w%d" % (r["block_l"], r["block_j"], r["warps"]), "%.2f ms" % r["ms"],
          "%.1f G slots/s" % r["ginterp_s"], "err %.1e %.1e" % (r["err_cross"], r["err_third"]))' "$name"
done
