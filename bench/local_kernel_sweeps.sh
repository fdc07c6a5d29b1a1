#!/bin/bash
# The fused local kernel's block shapes on a local search's real shapes (bench/local_kernel.py), one device call:
# box 256 at the radius of the TRPV1-like full set's last iterations (115 px), T = 9, the candidates of a HEALPix
# order-7 (and order-5) local search, the E-step's shell-ordered pixels; with and without each particle's valid count,
# and raster pixels for comparison. JSON per case under $OUT (else bench/results), one summary line per shape.
#   bash bench/local_kernel_sweeps.sh [N_PARTICLES=2048] [TIMEOUT_PER_CASE_S=150]
set -uo pipefail
n=${1:-2048}; limit=${2:-150}
source bench/device_env.sh
cases=(
  "o7-shell-counts|--candidates local:7 --pixels shell --counts|8,16,32;16,32,64;2,4,8"
  "o7-shell-all|--candidates local:7 --pixels shell|16;32;4"
  "o7-raster-counts|--candidates local:7 --pixels raster --counts|16,32;32;4"
  "o5-shell-counts|--candidates local:5 --pixels shell --counts|8,16,32;32,64;4,8"
)
for c in "${cases[@]}"; do
  IFS='|' read -r name flags sweep <<< "$c"
  # shellcheck disable=SC2086
  timeout "$limit" python3 bench/local_kernel.py "$out/local-kernel-$name.json" --n "$n" --box 256 --radius 115 \
    --TL 9x1 $flags --sweep "$sweep" 2>&1 | grep -E '^\{|failed' | python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        print(line.rstrip()); continue
    r = json.loads(line)
    print(sys.argv[1], "L=%d" % r["L"], "%dx%d w%d" % (r["block_l"], r["block_j"], r["warps"]), "%.2f ms" % r["ms"],
          "%.1f G slots/s" % r["ginterp_s"], "err %.1e %.1e" % (r["err_cross"], r["err_third"]))' "$name"
done
