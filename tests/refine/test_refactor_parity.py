"""The run-time refactor (issue 19) leaves results unchanged: a fixed-seed refinement and classification at the commit
before the run became frozen state and one loop (aef3eed) and at this checkout give the same maps (within 1e-5
relative), poses and classes on the CPU (bench/refactor_parity.py; the GPU comparison is in bench/results).

Both on the whole padded grids (CRYOREFINE_WHOLE_GRIDS; tests/estep/test_windowed_grids.py compares the windowed
ones). Needs the repository's history (skipped in a shallow clone). MKL_CBWR=COMPATIBLE: MKL otherwise picks code
paths by buffer alignment, which differs between the two versions, and its last bits with them.
"""

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BEFORE = "aef3eed"  # the last commit before the loop refactor (7d953ef)
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


def test_loop_refactor_gives_the_same_results(tmp_path, monkeypatch):
    from refactor_parity import parity

    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    monkeypatch.setenv("CRYOREFINE_WHOLE_GRIDS", "1")  # the windowed grids change the interpolation's last bits
    old = checkout(BEFORE, tmp_path / "before")
    res = parity(str(old), str(ROOT), tmp_path / "work")
    maps = {k: v for k, v in res.items() if k.startswith("map ")}
    assert len(maps) == 5, res  # refine final and both halves, two classes
    assert all(v <= 1e-5 for v in maps.values()), res
    assert res["refine max angle difference (deg)"] <= 1e-3 and res["classify max angle difference (deg)"] <= 1e-3, res
    assert res["refine max offset difference (A)"] <= 1e-4, res
    assert res["classify particles in another class"] == 0, res
