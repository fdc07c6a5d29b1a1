"""Refactors leave results unchanged: a fixed-seed refinement and classification at a baseline commit and at this
checkout give the same maps (within 1e-5 relative), poses and classes on the CPU (bench/refactor_parity.py; the GPU
comparison is in bench/results).

History of the baseline: aef3eed (before the run became frozen state and one loop, issue 19) gave the same results as
6a09791. The CPU's compiled loops (51332a7, 795fc23: interpolation coordinates in float64, a local search's products
summed in another order, shifts as centre times grid) then moved the last bits on purpose, which flips classes in this
small classification; tests/projection/test_cpu_kernels.py and tests/estep/test_cpu_scores.py compare them with the
PyTorch paths. c252e3c then moved the maps on purpose: the M-step's gridding iterations run on RELION's grid for the
window (reconstruction/reconstruct.gridding_grid_size; tests/relion/test_relion_reconstruct_noisy.py compares it with
relion_reconstruct --maxres). The baseline is now c252e3c. Needs the repository's history (skipped in a shallow clone).
MKL_CBWR=COMPATIBLE: MKL otherwise picks code paths by buffer alignment, which differs between the two versions, and
its last bits with them.
"""

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "c252e3c"  # RELION's gridding grid (see above)
sys.path.insert(0, str(ROOT / "bench"))


def checkout(commit: str, dest: Path) -> Path:
    """src/ of ``commit`` extracted into ``dest`` (git archive: the repository itself is not touched)."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    p = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"commit {commit} not in this clone (shallow?): {p.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_refactors_give_the_same_results(tmp_path, monkeypatch):
    from refactor_parity import parity

    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    old = checkout(BEFORE, tmp_path / "before")
    res = parity(str(old), str(ROOT), tmp_path / "work")
    maps = {k: v for k, v in res.items() if k.startswith("map ")}
    assert len(maps) == 5, res  # refine final and both halves, two classes
    assert all(v <= 1e-5 for v in maps.values()), res
    assert res["refine max angle difference (deg)"] <= 1e-3 and res["classify max angle difference (deg)"] <= 1e-3, res
    assert res["refine max offset difference (A)"] <= 1e-4, res
    assert res["classify particles in another class"] == 0, res
