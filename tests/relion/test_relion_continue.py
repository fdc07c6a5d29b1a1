"""Our 3D classification's files as RELION 3.1.3's programs read a Class3D job's outputs (Debian's binaries).

A tiny classification of ours (K=2, box 24, 80 particles on three micrographs, 2 iterations, CPU), run from a project
directory as RELION's jobs are, then:

- ``relion_refine --continue run_it002_optimiser.star --o c/run_ct2 --iter 3 --j 1`` (the GUI's continue) reads our
  optimiser.star, model.star, data.star and sampling.star (every label its readers require) and runs iteration 3: its
  files are there, its log has no error, its model has our 2 classes with a distribution summing to 1, it groups the
  particles as our model.star does (one noise spectrum per micrograph: fewer groups crash it) and its E-step is not
  flat (mean pmax well above the uniform posterior's). Control: the same files with σ² in our unnormalised DFT's units
  (× box⁴, what we wrote before) make RELION's iteration collapse to pmax ~1e-4, below the bound.
- RELION's Select path: the optimiser.star names a classification model (rlnDoAutoRefine 0, no rlnModelStarFile2),
  whose classes' maps exist, and relion_star_handler selects class 1 from the data.star it names.
"""

import re
import shutil
import subprocess

import numpy as np
import pytest
import starfile

from cryorefine.cli.main import main as cli
from cryorefine.io.star import read_star, write_star, write_star_table
from small_set import packaged_model_set

pytestmark = [
    pytest.mark.relion,
    pytest.mark.skipif(
        shutil.which("relion_refine") is None or shutil.which("relion_star_handler") is None,
        reason="RELION binaries not installed",
    ),
]

BOX, ANGPIX, K = 24, 8.0, 2
FLAGS = (
    f"--K {K} --iter 2 --tau2_fudge 4 --ini_high 40 --particle_diameter 170 --healpix_order 1 --offset_range 2 "
    "--offset_step 2 --ctf --flatten_solvent --zero_mask --random_seed 1"
).split()
MIN_PMAX = 0.01  # RELION's continued mean pmax: ~0.1-0.25 here; ~1e-4 when the σ² it reads are box⁴ too large


def relion(cwd, *args):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The project directory: particles on three micrographs (in a RELION job folder, listed out of their sorted order,
    so RELION's groups follow its sort), and our classification in c/ (run from here, names relative to here)."""
    d = packaged_model_set(tmp_path_factory.mktemp("relion_continue"), 80, seed=3, box=BOX, angpix=ANGPIX)
    blocks = read_star(d / "particles_noposes.star")
    n = len(blocks["particles"])
    blocks["particles"]["rlnMicrographName"] = [f"MotionCorr/job002/Movies/mic{(7 * i) % 3}.mrc" for i in range(n)]
    write_star(d / "particles_mics.star", blocks)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(d)
        assert cli(["classify", "--i", "particles_mics.star", "--o", "c/run", "--ref", "truth.mrc", *FLAGS]) == 0
    return d


def continued(d, root: str):
    """RELION continues ``root``_it002_optimiser.star for one iteration: (its output, its iteration-3 model.star)."""
    p = relion(d, "relion_refine", "--continue", f"{root}_it002_optimiser.star", "--o", f"{root}_ct2", "--iter", 3,
               "--j", 1)  # fmt: skip
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-3000:]
    return log, starfile.read(d / f"{root}_ct2_it003_model.star")


def test_relion_continues_our_classification(project):
    d = project
    log, model = continued(d, "c/run")
    print("RELION's continued run:\n" + "\n".join([line for line in log.splitlines() if "~~" not in line][-12:]))
    unknown = re.findall(r"unknown label: (\w+)", log)
    # model_general's rlnNrOpticsGroups is RELION 4/5's (it then reads model_optics_group_N): 3.1 warns and ignores it
    assert "ERROR" not in log and set(unknown) <= {"rlnNrOpticsGroups"}, unknown
    for suffix in ("data.star", "model.star", "optimiser.star", "sampling.star", "class001.mrc", "class002.mrc"):
        assert (d / f"c/run_ct2_it003_{suffix}").is_file(), suffix
    general, classes = model["model_general"], model["model_classes"]
    assert int(general["rlnNrClasses"]) == K and len(classes) == K
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0, abs=1e-5)
    pmax = float(general["rlnAveragePmax"])
    print(f"RELION's continued mean pmax {pmax:.4f}")
    assert pmax > MIN_PMAX
    # RELION groups the particles itself (per micrograph) and indexes our σ² by those groups: ours are its groups
    ours = starfile.read(d / "c/run_it002_data.star")["particles"].set_index("rlnImageName")["rlnGroupNumber"]
    theirs = starfile.read(d / "c/run_ct2_it003_data.star")["particles"].set_index("rlnImageName")["rlnGroupNumber"]
    assert len(set(theirs)) == 3 and int(general["rlnNrGroups"]) == 3
    assert (ours.loc[theirs.index].to_numpy() == theirs.to_numpy()).all()


def test_control_sigma2_in_our_own_units_collapse_relion(project):
    """The control: our files with σ² × box⁴ (our unnormalised DFT's units) run, but RELION's E-step is flat."""
    d = project
    (d / "old").mkdir()
    for f in (d / "c").glob("run_it002_*"):
        shutil.copy(f, d / "old" / f.name)
    for f in (d / "old").glob("*.star"):
        f.write_text(f.read_text().replace("c/run_it002", "old/run_it002"))
    model = d / "old" / "run_it002_model.star"
    blocks = read_star(model)
    for name in [b for b in blocks if b.startswith("model_group_")]:
        blocks[name]["rlnSigma2Noise"] *= BOX**4
    write_star_table(model, {**blocks, "model_general": blocks["model_general"].iloc[0].to_dict()})
    _, model3 = continued(d, "old/run")
    pmax = float(model3["model_general"]["rlnAveragePmax"])
    print(f"control: RELION's mean pmax with σ² × box⁴: {pmax:.2e}")
    assert pmax < MIN_PMAX


def test_relion_select_reads_our_classification(project):
    """RELION's Subset selection on a Class3D job: the optimiser.star's model (a classification's: one model.star,
    not half sets) with each class's map and statistics, and its data.star, from which relion_star_handler selects."""
    d = project
    opt = read_star(d / "c/run_it002_optimiser.star")["optimiser_general"].iloc[0]
    assert int(opt["rlnDoAutoRefine"]) == 0 and int(opt["rlnDoSplitRandomHalves"]) == 0
    assert "rlnModelStarFile2" not in opt.index
    model = read_star(d / opt["rlnModelStarFile"])
    assert int(model["model_general"]["rlnNrClasses"].iloc[0]) == K
    classes = model["model_classes"]
    for label in ("rlnClassDistribution", "rlnAccuracyRotations", "rlnAccuracyTranslationsAngst",
                  "rlnEstimatedResolution", "rlnOverallFourierCompleteness"):  # fmt: skip
        assert np.isfinite(classes[label].to_numpy(dtype=float)).all(), label
    for image in classes["rlnReferenceImage"]:
        assert (d / image).is_file(), image
    data = opt["rlnExperimentalDataStarFile"]
    p = relion(d, "relion_star_handler", "--i", data, "--select", "rlnClassNumber", "--minval", 1, "--maxval", 1,
               "--o", "selected.star")  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ours = starfile.read(d / data)["particles"]
    selected = starfile.read(d / "selected.star")["particles"]
    assert 0 < len(selected) == int((ours["rlnClassNumber"] == 1).sum()) < len(ours)
    assert set(selected["rlnImageName"]) == set(ours["rlnImageName"][ours["rlnClassNumber"] == 1])
