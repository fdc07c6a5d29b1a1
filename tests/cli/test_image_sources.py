"""Where the particle images come from: the stacks batch by batch (streaming), host memory (--preread_images) or
copies on a scratch disk (--scratch_dir) give the same refinement; the copies are gone afterwards and the outputs name
the original stacks; a pre-read that cannot fit is one line."""

import numpy as np
import pytest
import starfile

import cryorefine.io.image_cache as image_cache
from cryorefine.cli.main import main as cli
from cryorefine.io.mrc import read_map
from small_set import small_set

FLAGS = "--ini_high 30 --particle_diameter 170 --iter 2 --healpix_order 1 --offset_range 2 --offset_step 1 --j 1"


def _refine(d, name: str, *extra: str) -> tuple[np.ndarray, dict]:
    argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / name / "run"), "--ref", str(d / "start.mrc"),
            "--batch", "16", *FLAGS.split(), *extra]  # fmt: skip
    assert cli(argv) == 0
    last = sorted((d / name).glob("run_it*_data.star"))[-1]
    return read_map(d / name / "run_class001.mrc")[0], starfile.read(last)


def test_streamed_preread_and_scratch_images_refine_the_same(tmp_path):
    d = small_set(tmp_path, 32, 6.0, 40, seed=2)
    scratch = tmp_path / "local_disk"
    runs = {
        "streamed": _refine(d, "streamed"),
        "preread": _refine(d, "preread", "--preread_images"),
        "scratch": _refine(d, "scratch", "--scratch_dir", str(scratch)),
    }
    ref_map, ref_star = runs["streamed"]
    for name in ("preread", "scratch"):
        m, star = runs[name]
        assert np.array_equal(m, ref_map), name
        for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
            assert np.array_equal(star["particles"][col], ref_star["particles"][col]), (name, col)
        # the outputs name the original stacks, not the copies
        assert list(star["particles"]["rlnImageName"]) == list(ref_star["particles"]["rlnImageName"])
    log = (d / "scratch" / "run.log").read_text()
    assert "--scratch_dir: 1 stack(s)" in log and "copied to" in log
    assert "--preread_images: 40 images" in (d / "preread" / "run.log").read_text()
    assert scratch.is_dir() and not list(scratch.iterdir())  # the copies went when the run ended


def test_a_preread_that_does_not_fit_is_one_line(tmp_path, monkeypatch, capsys):
    d = small_set(tmp_path, 32, 6.0, 20, seed=3)
    monkeypatch.setattr(image_cache, "host_free_bytes", lambda: 1 << 10)  # 1 KiB free
    argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / "r" / "run"), "--ref", str(d / "start.mrc"),
            "--preread_images", *FLAGS.split()]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--preread_images needs" in err and "GiB are free" in err and "--scratch_dir" in err, err


@pytest.mark.parametrize("free_gib", [0.0])
def test_a_scratch_disk_too_small_reads_the_stacks_where_they_are(tmp_path, monkeypatch, free_gib):
    import cryorefine.io.scratch as scratch

    d = small_set(tmp_path, 32, 6.0, 20, seed=4)
    monkeypatch.setattr(scratch, "free_bytes", lambda folder: int(free_gib * 2**30))
    argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / "r" / "run"), "--ref", str(d / "start.mrc"),
            "--scratch_dir", str(tmp_path / "small"), *FLAGS.split()]  # fmt: skip
    assert cli(argv) == 0
    assert "do not fit" in (d / "r" / "run.log").read_text()
    assert not list((tmp_path / "small").iterdir())


def test_a_scratch_dir_that_cannot_be_made_is_one_line_and_leaves_the_outputs(tmp_path, capsys):
    d = small_set(tmp_path, 32, 6.0, 20, seed=5)
    (tmp_path / "a_file").write_text("not a folder")
    (d / "r").mkdir()
    earlier = d / "r" / "run_it001_data.star"
    earlier.write_text("an earlier run's output\n")
    argv = ["refine", "--i", str(d / "particles.star"), "--o", str(d / "r" / "run"), "--ref", str(d / "start.mrc"),
            "--scratch_dir", str(tmp_path / "a_file" / "scratch"), *FLAGS.split()]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--scratch_dir cannot be used" in err and "a_file" in err, err
    assert earlier.read_text() == "an earlier run's output\n"
