#!/bin/bash
# The usual device call of issue 23 in one command, its results in two files under $OUT (a call brings back 8 files at
# most, and a long output's head is lost): summary.txt, the lines to read, and session.tgz, every log, report and
# profile. In order: `pytest -m gpu tests`, then `paper_bench.sh run` of each set (clean starts), then the profiles.
#   bash bench/device_session.sh [SETS] [PROFILES]        e.g. bench/device_session.sh "trpv1 betagal" "trpv1:12"
# SETS: paper_bench sets ("-" for none); PROFILES: SET:ITERATIONS[:MODE] for bench/profile_iteration.sh (after its set
# ran; MODE torch by default, or python, waits).
# Then bench/startup_phases.py on the first set (a fresh process's phases and the profile of its start-up; STARTUP=0
# skips it). GPU_TESTS=0 skips the tests. Budgets: trpv1 130 s, betagal 80 s (reserve 25 s), others 480 s.
# REPEAT=2 runs each set twice, clean starts: a machine's first run of a set pays a once-per-machine cost at its new
# windows' M-steps (bench/results/2026-12-06f-device-runs.md); the first run's files go to SET-first/.
# MSTEP_BEFORE=DIR (a src/ folder of an earlier tree, carried: e.g. `git archive REV src | tar -x -C .before`) first
# times the M-step's reconstruct() at TRPV1's size (bench/mstep_timing.py: box 256, window 80 and whole) with that
# src/ and this one, alternating, twice each (MSTEP_ARGS, default "--box 256 --window 80 --devices cuda").
set -uo pipefail
sets=${1:-"trpv1 betagal"}; profiles=${2:-}
[ "$sets" = "-" ] && sets=""
final=${OUT:?OUT: the folder whose files come back}
work=$(mktemp -d)
summary=$final/summary.txt
source bench/device_env.sh
export OUT=$work out=$work  # the steps below write their files here
say() { echo "$@" | tee -a "$summary"; }
say "device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); tree: $(git log -1 --format=%h 2>/dev/null) (the device's git may be stale); $(date -u +%FT%TZ)"
if [ "${GPU_TESTS:-1}" != 0 ]; then
  timeout 300 python3 -m pytest -m gpu tests -q -p no:warnings --tb=short > "$work/gpu_tests.txt" 2>&1
  say "gpu tests: $(grep -E '[0-9]+ (passed|failed)' "$work/gpu_tests.txt" | tail -1)"
  grep -E "^(FAILED|ERROR) |^E  " "$work/gpu_tests.txt" | head -20 | tee -a "$summary"
fi
if [ -n "${MSTEP_BEFORE:-}" ]; then
  for rep in 1 2; do
    for tree in "$MSTEP_BEFORE" "$PWD/src"; do
      # shellcheck disable=SC2086
      PYTHONPATH=/tmp/site:$tree python3 bench/mstep_timing.py "$work/mstep-$rep" \
        ${MSTEP_ARGS:---box 256 --window 80 --devices cuda} 2>&1 | sed "s|^|$tree: |" >> "$work/mstep_ab.txt"
    done
  done
  grep "'device'" "$work/mstep_ab.txt" | tee -a "$summary"
fi
for s in $sets; do
  case $s in
    trpv1) args="130" ;;
    betagal) args="80 --reserve 25" ;;
    *) args="480" ;;
  esac
  for rep in $(seq 1 "${REPEAT:-1}"); do
    if [ "$rep" -gt 1 ]; then  # a clean start again (paper_bench then starts its list of calls again)
      rm -rf "${BENCH_WORKDIR:-/tmp/cryobench}/$s/run"
      mkdir -p "$work/$s-first" && mv "$work"/*-"$s"[.-]* "$work/$s-call-out.log" "$work/$s-first/" 2>/dev/null
    fi
    # shellcheck disable=SC2086
    bash bench/paper_bench.sh run "$s" $args --cpu_n 0 > "$work/$s-call-out.log" 2>&1
    say "$s (run $rep): $(grep -E 'call took' "$work/$s-call-out.log" | tail -1)"
    md=$(ls "$work"/*-"$s".md 2>/dev/null | head -1)
    [ -n "$md" ] && grep -E "^\| (wall time|iterations|gold-standard|GPU busy)" "$md" | tee -a "$summary"
  done
done
first=${sets%% *}
if [ -n "$first" ] && [ "${STARTUP:-1}" != 0 ]; then  # a fresh process's start-up on the first set's data, profiled
  python3 bench/startup_phases.py "$first" "$work/startup-$first.json" --gpu --profile "$work/startup-$first-profile.txt" \
    > "$work/startup-$first.txt" 2>&1
  tee -a "$summary" < "$work/startup-$first.txt"
fi
for p in $profiles; do
  IFS=: read -r pset pits pmode <<< "$p"; pmode=${pmode:-torch}
  PROFILE_TIMEOUT=150 bash bench/profile_iteration.sh "$pset" "$pits" "$pmode" > "$work/profile-$pset-$pmode-out.log" 2>&1
  head -16 "$work/profile-$pset-$pmode.txt" 2>/dev/null | tee -a "$summary"
done
tar czf "$final/session.tgz" -C "$work" .
say "session.tgz: $(ls "$work" | wc -l) files"
