#!/bin/bash
# The CUDA caching allocator's settings compared on the paper benchmarks (bench/ab.sh, whose files it writes):
#   bash bench/allocator_ab.sh "SETS" "CONF_A|CONF_B" [REPEATS]    e.g. bench/allocator_ab.sh "betagal trpv1" "|expandable_segments:True" 2
# Each CONF is PYTORCH_CUDA_ALLOC_CONF for one run ("" for PyTorch's own default; "-" leaves cryorefine's choice).
set -uo pipefail
IFS='|' read -ra confs <<< "${2:?CONFS}"
variants=()
for c in "${confs[@]}"; do
  if [ "$c" = "-" ]; then variants+=(""); else variants+=("PYTORCH_CUDA_ALLOC_CONF=$c"); fi
done
exec bash "$(dirname "$0")/ab.sh" "${1:?SETS}" "$(IFS='|'; echo "${variants[*]}")" "${3:-1}"
