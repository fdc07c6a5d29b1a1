#!/bin/bash
# Variants of a run compared on the paper benchmarks, clean starts alternating on one device:
#   bash bench/ab.sh "SETS" "VARIANT_A|VARIANT_B|..." [REPEATS]
#   e.g. bench/ab.sh betagal "|--batch 4480" 2
# A VARIANT is words: NAME=VALUE sets that environment variable for the run (NAME= sets it empty), any other word is
# a flag for our refine/classify (paper_bench --extra); "" is cryorefine's defaults. PYTORCH_CUDA_ALLOC_CONF is unset
# unless a variant sets it. Writes $OUT/ab.txt (per run: wall time, iterations, resolution, each iteration's stages
# and the run.log's allocator events) and $OUT/ab.tgz (the runs' logs and reports).
set -uo pipefail
sets=${1:?SETS}; variants=${2:?VARIANTS}; repeats=${3:-1}
final=${OUT:?OUT}
work=$(mktemp -d)
summary=$final/ab.txt
source bench/device_env.sh
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); $(date -u +%FT%TZ)" | tee -a "$summary"
IFS='|' read -ra variant_list <<< "$variants"
for s in $sets; do
  OUT=$work bash bench/paper_bench.sh build "$s" 300 > "$work/$s-build.log" 2>&1
  for rep in $(seq 1 "$repeats"); do
    for i in "${!variant_list[@]}"; do
      v=${variant_list[$i]}; tag=$s-$rep-$i; envs=(); flags=()
      for word in $v; do
        if [[ $word =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then envs+=("$word"); else flags+=("$word"); fi
      done
      mkdir -p "$work/$tag"; rm -rf /tmp/cryobench/"$s"/run  # a clean start
      env -u PYTORCH_CUDA_ALLOC_CONF "${envs[@]}" OUT="$work/$tag" \
        bash bench/paper_bench.sh run "$s" 200 --cpu_n 0 --extra="${flags[*]}" > "$work/$tag/out.log" 2>&1
      log=$(find /tmp/cryobench/"$s"/run -name run.log | head -1)
      cp "$log" "$work/$tag/run.log" 2>/dev/null
      md=$(ls "$work/$tag"/*-"$s".md 2>/dev/null | head -1)
      {
        echo "== $s run $rep, variant '$v'"
        [ -n "$md" ] && grep -E "^\| (wall time|iterations|gold-standard|GPU busy)" "$md"
        grep -o "iter *[0-9]*.*M-step=[0-9.]*s\|GPU allocator: [^;]*" "$work/$tag/run.log" | sed -E 's/resolution.*\[/[/' | paste -sd' ' \
          | sed 's/iter /\n  iter /g'
        echo
      } | tee -a "$summary"
    done
  done
done
tar czf "$final/ab.tgz" -C "$work" .
