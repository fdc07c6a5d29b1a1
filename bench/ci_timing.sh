#!/bin/bash
# CI-like timing on 2 cores of the device machine (taskset), no GPU: the refinement test and the demo.
export CUDA_VISIBLE_DEVICES= PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
( time taskset -c 0,1 timeout ${1:-300} python3 -m pytest -x -q tests/refine 2>&1 | tail -4 ) > $OUT/ci_refine_2cores.txt 2>&1
f=$(ls -td /tmp/pytest-of-*/pytest-*/refine*/out 2>/dev/null | head -1); cut -c22-200 $f/run.log >> $OUT/ci_refine_2cores.txt 2>/dev/null
( time taskset -c 0,1 timeout ${2:-300} python3 -m cryorefine.cli.main demo --o /tmp/demo 2>&1 | grep -v "particles, .*/s" | cut -c1-220 | tail -14 ) > $OUT/demo_2cores.txt 2>&1
