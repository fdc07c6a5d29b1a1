# Sourced by the device-call scripts (paper_bench.sh, scaling.sh) from the repository root: installs the carried
# dependency wheels (.whl: mrcfile, starfile, gemmi) into /tmp/site once per machine, puts them and src/ on
# PYTHONPATH, and makes the result folder $out ($OUT on the device, else bench/results).
export PYTHONUNBUFFERED=1
if [ ! -f /tmp/site/.cryobench_ok ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && touch /tmp/site/.cryobench_ok || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
out=${OUT:-bench/results}
mkdir -p "$out"
