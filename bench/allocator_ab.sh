#!/bin/bash
# The CUDA caching allocator's settings compared on the paper benchmarks, clean starts alternating on one device:
#   bash bench/allocator_ab.sh "SETS" "CONF_A|CONF_B" [REPEATS]    e.g. bench/allocator_ab.sh "betagal trpv1" "|expandable_segments:True" 2
# Each CONF is PYTORCH_CUDA_ALLOC_CONF for one run ("" for PyTorch's own default; "-" leaves cryorefine's choice).
# Writes $OUT/allocator_ab.txt (per run: wall time, iterations, resolution, the run.log's allocator events) and
# $OUT/allocator_ab.tgz (the runs' logs and reports).
set -uo pipefail
sets=${1:?SETS}; confs=${2:?CONFS}; repeats=${3:-1}
final=${OUT:?OUT}
work=$(mktemp -d)
summary=$final/allocator_ab.txt
source bench/device_env.sh
echo "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); $(date -u +%FT%TZ)" | tee -a "$summary"
IFS='|' read -ra conf_list <<< "$confs"
for s in $sets; do
  OUT=$work bash bench/paper_bench.sh build "$s" 300 > "$work/$s-build.log" 2>&1
  for rep in $(seq 1 "$repeats"); do
    for i in "${!conf_list[@]}"; do
      c=${conf_list[$i]}; tag=$s-$rep-$i
      mkdir -p "$work/$tag"; rm -rf /tmp/cryobench/"$s"/run  # a clean start
      if [ "$c" = "-" ]; then
        env -u PYTORCH_CUDA_ALLOC_CONF OUT="$work/$tag" bash bench/paper_bench.sh run "$s" 200 --cpu_n 0 > "$work/$tag/out.log" 2>&1
      else
        PYTORCH_CUDA_ALLOC_CONF=$c OUT="$work/$tag" bash bench/paper_bench.sh run "$s" 200 --cpu_n 0 > "$work/$tag/out.log" 2>&1
      fi
      log=$(find /tmp/cryobench/"$s"/run -name run.log | head -1)
      cp "$log" "$work/$tag/run.log" 2>/dev/null
      md=$(ls "$work/$tag"/*-"$s".md 2>/dev/null | head -1)
      {
        echo "== $s run $rep, PYTORCH_CUDA_ALLOC_CONF='$c'"
        [ -n "$md" ] && grep -E "^\| (wall time|iterations|gold-standard|GPU busy)" "$md"
        grep -o "iter *[0-9]*.*M-step=[0-9.]*s\|GPU allocator: [^;]*" "$work/$tag/run.log" | sed -E 's/resolution.*\[/[/' | paste -sd' ' \
          | sed 's/iter /\n  iter /g'
        echo
      } | tee -a "$summary"
    done
  done
done
tar czf "$final/allocator_ab.tgz" -C "$work" .
