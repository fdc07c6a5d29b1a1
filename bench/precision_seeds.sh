#!/bin/bash
# Issue 23's TF32 decision in one device call: a paper benchmark set run once per PRECISION:SEED, each from the same
# data (the set's /tmp/cryobench folder, built by `paper_bench.sh run SET` first), its report in $OUT/SET-PREC-seedN/.
#   usage: bash bench/precision_seeds.sh SET BUDGET_S "fp32:0 fp32:1 tf32:0 tf32:1"
set -uo pipefail
set_=${1:?SET}; budget=${2:?BUDGET_S}; specs=${3:?"PRECISION:SEED ..."}
source bench/device_env.sh
for spec in $specs; do
  p=${spec%:*}; s=${spec#*:}; w=/tmp/prec-$p-$s
  mkdir -p "$w/$set_" && { [ -e "$w/$set_/data" ] || ln -s "/tmp/cryobench/$set_/data" "$w/$set_/data"; }
  echo "== $set_ --precision $p --random_seed $s"
  OUT=$out/$set_-$p-seed$s bash bench/paper_bench.sh run "$set_" "$budget" --cpu_n 0 --workdir "$w" \
    --extra "--precision $p --random_seed $s" 2>&1 | grep -E "finished|Status|gold|call took|rror" | tail -4
done
