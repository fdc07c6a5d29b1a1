"""Image paths as RELION reads them: relative to the directory a program runs in (the project directory).

RELION's programs look for `index@stack` from where they run, never from the STAR file's folder. `cryorefine
simulate` and every particle STAR we write (run_data.star and the per-iteration data.star) must be readable by
relion_stack_create and relion_reconstruct run from the directory our command ran in. The control: the names
relative to the STAR file's folder (what simulate wrote before) are not found by RELION.
"""

import shutil
import subprocess
import sys

import mrcfile
import pytest

from cryorefine.io.particles import load_particles, write_particles
from cryorefine.io.star import read_star, write_star

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_stack_create") is None or shutil.which("relion_reconstruct") is None,
        reason="RELION binaries not installed",
    ),
]

N = 12


def run(cwd, *args):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project directory in which `cryorefine simulate --o sim` ran."""
    root = tmp_path_factory.mktemp("project")
    p = run(root, sys.executable, "-m", "cryorefine.cli.main", "simulate", "--o", "sim", "--n", N, "--box", 32,
            "--angpix", 3.0, "--snr", 1.0, "--seed", 2)  # fmt: skip
    assert p.returncode == 0, p.stderr
    return root


def test_simulate_names_are_relative_to_where_it_ran(project):
    names = read_star(project / "sim" / "particles.star")["particles"]["rlnImageName"]
    assert names.iloc[0] == "000001@sim/particles.mrcs"
    p = run(project, "relion_stack_create", "--i", "sim/particles.star", "--o", "stacked")
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
    with mrcfile.open(project / "stacked.mrcs") as m:
        assert m.data.shape == (N, 32, 32)
    p = run(project, "relion_reconstruct", "--i", "sim/particles.star", "--o", "rec.mrc", "--ctf")
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
    assert (project / "rec.mrc").is_file()


def test_names_relative_to_the_star_folder_are_not_found_by_relion(project):
    """The control: the old names (relative to sim/) fail in RELION run from the project directory."""
    blocks = read_star(project / "sim" / "particles.star")
    blocks["particles"]["rlnImageName"] = [f"{i + 1:06d}@particles.mrcs" for i in range(N)]
    write_star(project / "sim" / "star_folder_names.star", blocks)
    p = run(project, "relion_reconstruct", "--i", "sim/star_folder_names.star", "--o", "bad.mrc", "--ctf")
    assert p.returncode != 0 or not (project / "bad.mrc").exists()


def test_written_particles_are_relative_to_where_we_run(project, monkeypatch):
    """A STAR whose names we found in its own folder is written with names RELION finds from here."""
    monkeypatch.chdir(project)
    table = load_particles("sim/star_folder_names.star")
    (project / "Refine3D").mkdir(exist_ok=True)
    write_particles("Refine3D/run_data.star", table)
    names = read_star(project / "Refine3D" / "run_data.star")["particles"]["rlnImageName"]
    assert names.iloc[-1] == f"{N:06d}@sim/particles.mrcs"
    p = run(project, "relion_reconstruct", "--i", "Refine3D/run_data.star", "--o", "rec2.mrc", "--ctf")
    assert p.returncode == 0, p.stdout[-1500:] + p.stderr[-1500:]
