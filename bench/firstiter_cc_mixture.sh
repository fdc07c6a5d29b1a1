#!/bin/bash
# --firstiter_cc with a reference on another greyscale, on the 3-state mixture of bench/classify_mixture.py (3,000
# particles, box 64, 3 Å/px, SNR 0.05, the flags of bench/results/2026-11-26-mixture-class3d-vs-relion.md): class
# accuracy with the start map on the right greyscale (without and with --firstiter_cc) and 100 times too bright with
# --firstiter_cc. One JSON line per run in $out/firstiter-cc-mixture.jsonl.   bash bench/firstiter_cc_mixture.sh [--gpu]
set -uo pipefail
device=${1:-}
source bench/device_env.sh
flags="--offset_range 5 --offset_step 2 --strict_highres_exp 10"
for run in "right 1 " "right_cc 1 --firstiter_cc" "bright100_cc 100 --firstiter_cc"; do
  set -- $run
  name=$1 scale=$2 extra="${3:-}"
  python3 bench/classify_mixture.py /tmp/mix64 3000 64 3.0 $device --iter 25 --K 3 --healpix_order 1 --diameter 170 \
    --ref_scale "$scale" --name "$name" --extra "$flags $extra" 2> "$out/firstiter-cc-$name.log" | tail -1 | \
    python3 -c "import json,sys; d=json.loads(sys.stdin.read()); d['run']='$name'; print(json.dumps(d))" >> "$out/firstiter-cc-mixture.jsonl"
  tail -1 "$out/firstiter-cc-mixture.jsonl"
done
