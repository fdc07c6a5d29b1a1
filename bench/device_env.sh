# Sourced by the device-call scripts (paper_bench.sh, scaling.sh) from the repository root: installs the carried
# dependency wheels (.whl: mrcfile, starfile, gemmi) into /tmp/site once per machine, puts them and src/ on
# PYTHONPATH, and makes the result folder $out ($OUT on the device, else bench/results). CRYOREFINE_SRC=DIR runs another
# tree's src/ (carried, e.g. `git archive REV src | tar -x -C .before`: CRYOREFINE_SRC=.before/src), as bench/ab.sh's
# variants may.
# The device image sets PYTHONDONTWRITEBYTECODE=1 and ships its Python packages without compiled files, so every
# process compiled src/, the wheels and torch's own modules again (import and CUDA start 6.5-8.2 s against 4.8-5.1 s
# with src/ and the wheels compiled, H100, 2026-12-05; `import torch` alone 3.2-3.6 s, 2026-12-06); a user's pip
# install compiles them once, so the benchmarks do too: src/, the wheels and the interpreter's site-packages.
export PYTHONUNBUFFERED=1
if [ ! -f /tmp/site/.cryobench_ok ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.cryobench_ok || exit 1
fi
if [ ! -f /tmp/.cryobench_compiled ]; then
  python3 -m compileall -q -j 0 src /tmp/site "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    >/dev/null 2>&1; touch /tmp/.cryobench_compiled
fi
export PYTHONPATH=/tmp/site:$(realpath "${CRYOREFINE_SRC:-src}")${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/results}
mkdir -p "$out"
