import errno
import os
import shutil
import subprocess

import mrcfile
import numpy as np
import pytest

from cryorefine.errors import CryoInputError
from cryorefine.io import atomic
from cryorefine.io import mrc as mrc_module
from cryorefine.io.atomic import atomic_write, temp_path_for
from cryorefine.io.mrc import StackWriter, open_stack, read_map, write_map, write_maps, write_stack


def _without_labels(path) -> bytes:
    """The file's bytes less the header's ten 80-character labels (bytes 224-1023): mrcfile stamps the time to the
    second there, so two files written a moment apart differ in them."""
    raw = path.read_bytes()
    return raw[:224] + raw[1024:]


def test_map_round_trip(tmp_path):
    data = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    path = tmp_path / "map.mrc"
    write_map(path, data, 1.25, origin_angst=(1.0, 2.0, 3.0))
    out, angpix = read_map(path)
    assert out.dtype == np.float32 and np.array_equal(out, data)
    assert angpix == pytest.approx(1.25)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 2
        assert float(mrc.header.origin.z) == pytest.approx(3.0)
    assert [p.name for p in tmp_path.iterdir()] == ["map.mrc"]


def test_write_maps_in_threads_writes_the_files_write_map_writes(tmp_path):
    """Several maps at once (tensors or arrays) give byte for byte the files of write_map one at a time; a map whose
    folder is missing stops the call with the one-line error."""
    import torch

    g = np.random.default_rng(2)
    maps = [g.standard_normal((12, 12, 12)).astype(np.float32) for _ in range(3)]
    for k, m in enumerate(maps):
        write_map(tmp_path / f"one{k}.mrc", m, 1.3)
    write_maps([tmp_path / f"many{k}.mrc" for k in range(3)], [torch.from_numpy(maps[0]), *maps[1:]], 1.3)
    for k in range(3):
        assert _without_labels(tmp_path / f"many{k}.mrc") == _without_labels(tmp_path / f"one{k}.mrc")
    with pytest.raises(CryoInputError, match="output folder does not exist"):
        write_maps([tmp_path / "a.mrc", tmp_path / "missing" / "b.mrc"], maps[:2], 1.3)


def test_a_map_given_for_several_paths_is_copied_from_the_device_once(tmp_path, monkeypatch):
    """auto-refine's last iteration names each unfiltered half three times: one host copy, the same file at each."""
    import torch

    from cryorefine.io import mrc

    copied: list[int] = []

    def counted(maps):
        copied.append(len(maps))
        return to_host(maps)

    to_host = mrc.to_host
    monkeypatch.setattr(mrc, "to_host", counted)
    g = np.random.default_rng(3)
    a, b = (torch.from_numpy(g.standard_normal((10, 10, 10)).astype(np.float32)) for _ in range(2))
    names = ["a1", "b1", "a2", "a3", "b2"]
    write_maps([tmp_path / f"{n}.mrc" for n in names], [a, b, a, a, b], 2.0)
    assert copied == [2]
    write_map(tmp_path / "a.mrc", a.numpy(), 2.0)
    write_map(tmp_path / "b.mrc", b.numpy(), 2.0)
    for n in names:
        assert _without_labels(tmp_path / f"{n}.mrc") == _without_labels(tmp_path / f"{n[0]}.mrc")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(f"{n}.mrc" for n in names), "a.mrc", "b.mrc"])


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_read_map_modes(tmp_path, dtype):
    data = (np.arange(4**3).reshape(4, 4, 4) % 100).astype(dtype)
    path = tmp_path / "m.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = 2.0
    out, angpix = read_map(path)
    assert out.dtype == np.float32 and np.array_equal(out, data.astype(np.float32))
    assert angpix == 2.0


def test_read_map_errors(tmp_path):
    with pytest.raises(CryoInputError, match="not found"):
        read_map(tmp_path / "missing.mrc")
    (tmp_path / "text.mrc").write_text("hello, not an MRC file" * 100)
    with pytest.raises(CryoInputError, match="MRC"):
        read_map(tmp_path / "text.mrc")
    with mrcfile.new(tmp_path / "rect.mrc") as mrc:
        mrc.set_data(np.zeros((4, 4, 6), np.float32))
    with pytest.raises(CryoInputError, match=r"not a cubic 3D map \(shape \(4, 4, 6\)\)"):
        read_map(tmp_path / "rect.mrc")
    with mrcfile.new(tmp_path / "img.mrc") as mrc:
        mrc.set_data(np.zeros((4, 4), np.float32))
    with pytest.raises(CryoInputError, match="not a cubic 3D map"):
        read_map(tmp_path / "img.mrc")
    bad = np.zeros((4, 4, 4), np.float32)
    bad[1, 2, 3] = np.nan
    with pytest.warns(RuntimeWarning):
        write_map(tmp_path / "nan.mrc", bad, 1.0)
    with pytest.raises(CryoInputError, match="NaN"):
        read_map(tmp_path / "nan.mrc")


def test_stack_round_trip_and_subset_read(tmp_path):
    data = np.random.default_rng(1).normal(size=(10, 6, 6)).astype(np.float32)
    path = tmp_path / "s.mrcs"
    write_stack(path, data, 1.5)
    with open_stack(path) as stack:
        assert len(stack) == 10 and stack.shape == (10, 6, 6) and stack.angpix == pytest.approx(1.5)
        out = stack.read(np.array([7, 2, 2]))
        assert out.dtype == np.float32 and np.array_equal(out, data[[7, 2, 2]])
        assert stack.read(np.array([], int)).shape == (0, 6, 6)
        with pytest.raises(CryoInputError, match=r"image 11 .*holds 10 images") as info:
            stack.read(np.array([0, 10]))
        assert "s.mrcs" in str(info.value)
    with mrcfile.open(path) as mrc:
        assert mrc.header.mode == 2 and mrc.is_image_stack()


@pytest.mark.parametrize("piece_bytes, positional", [(None, True), (600, True), (600, False)])
def test_float32_stacks_read_by_file_reads_as_the_memory_map_gives_them(tmp_path, monkeypatch, piece_bytes, positional):
    """RELION's stacks (little-endian float32) are read by file reads, one per run of consecutive indices: the same
    images as mrcfile's memory map, for runs, repeats and any order, after an extended header too; a big-endian
    stack is read through the map. Also with reads shared by three threads in pieces that cut images (600 bytes), and
    in such pieces by seeks and reads where the OS has no positional reads."""
    monkeypatch.setattr(mrc_module, "POSITIONAL_READS", positional and mrc_module.POSITIONAL_READS)
    if piece_bytes is not None:
        monkeypatch.setattr(mrc_module, "READ_PIECE_BYTES", piece_bytes)
        monkeypatch.setattr(mrc_module, "READ_THREADS", 3)
    rng = np.random.default_rng(5)
    data = rng.normal(size=(40, 8, 8)).astype(np.float32)
    picks = np.array([3, 4, 5, 6, 0, 39, 38, 10, 10, 11, 12, 7, 20, 21])
    for name, ext, dtype in (("plain", 0, "<f4"), ("extended", 3 * 1024 + 80, "<f4"), ("big_endian", 0, ">f4")):
        path = tmp_path / f"{name}.mrcs"
        with mrcfile.new(path) as mrc:
            mrc.set_data(data.astype(dtype))
            mrc.set_image_stack()
            if ext:
                mrc.set_extended_header(np.zeros(ext, dtype="V1"))
        with mrcfile.mmap(path, mode="r") as mrc:
            assert mrc.header.nsymbt == ext and mrc.data.dtype == np.dtype(dtype)
            mapped = np.asarray(mrc.data[picks], dtype=np.float32)
        with open_stack(path) as stack:
            assert (stack._file is not None) == (dtype == "<f4"), name
            out = stack.read(picks)
            assert out.dtype == np.float32 and np.array_equal(out, mapped) and np.array_equal(out, data[picks]), name
            assert np.array_equal(stack.read(np.arange(40)), data) and np.array_equal(stack.read([39]), data[39:])
            into = np.full((len(picks), 8, 8), np.nan, np.float32)
            assert stack.read(picks, out=into) is into and np.array_equal(into, data[picks]), name
            with pytest.raises(ValueError, match="does not take"):
                stack.read(picks, out=into[:, :4])


def test_all_finite_finds_any_nan_or_inf_and_takes_an_overflowing_sum_as_finite():
    from cryorefine.io.mrc import all_finite

    images = np.random.default_rng(6).normal(size=(7, 16, 16)).astype(np.float32)
    assert all_finite(images)
    for bad in (np.nan, np.inf, -np.inf):
        for where in ((0, 0, 0), (6, 15, 15), (3, 7, 2)):
            damaged = images.copy()
            damaged[where] = bad
            assert not all_finite(damaged), (bad, where)
    huge = np.full((4, 8, 8), 3e38, np.float32)  # finite pixels whose float32 sum overflows
    with np.errstate(over="ignore"):
        assert all_finite(huge) and not np.isfinite(np.add.reduce(huge, axis=None))
    huge[1, 2, 3] = np.nan
    assert not all_finite(huge)


def test_single_image_and_float16_stack(tmp_path):
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(img)
    with open_stack(tmp_path / "one.mrc") as stack:
        assert stack.shape == (1, 4, 4)
        assert np.array_equal(stack.read([0])[0], img)
    half = np.random.default_rng(2).normal(size=(5, 8, 8)).astype(np.float16)
    with mrcfile.new(tmp_path / "half.mrcs") as mrc:
        mrc.set_data(half)
        mrc.set_image_stack()
    with open_stack(tmp_path / "half.mrcs") as stack:
        assert mrcfile.open(tmp_path / "half.mrcs").header.mode == 12
        out = stack.read([4, 0])
        assert out.dtype == np.float32 and np.array_equal(out, half[[4, 0]].astype(np.float32))


def test_stack_errors(tmp_path):
    with pytest.raises(CryoInputError, match="not found"):
        open_stack(tmp_path / "nope.mrcs")
    with mrcfile.new(tmp_path / "rect.mrcs") as mrc:
        mrc.set_data(np.zeros((3, 4, 6), np.float32))
    with pytest.raises(CryoInputError, match="not square"):
        open_stack(tmp_path / "rect.mrcs")


def test_large_stack_memory_mapped(tmp_path):
    n, box = 2000, 64
    path = tmp_path / "big.mrcs"
    with StackWriter(path, n, box, 2.0) as writer:
        for start in range(0, n, 500):
            block = np.broadcast_to(np.arange(start, start + 500, dtype=np.float32)[:, None, None], (500, box, box))
            writer.write(start, block)
    assert path.stat().st_size >= n * box * box * 4
    with open_stack(path) as stack:
        assert stack.shape == (n, box, box) and stack.angpix == 2.0
        out = stack.read(np.array([1999, 3, 1000]))
        assert np.array_equal(out[:, 0, 0], [1999, 3, 1000])
    with mrcfile.open(path, header_only=True) as mrc:
        assert mrc.header.dmax == pytest.approx(1999) and mrc.header.dmin == 0
        assert mrc.header.dmean == pytest.approx(999.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.mrcs"]


def test_stack_writer_abort_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StackWriter(tmp_path / "x.mrcs", 4, 8, 1.0) as writer:
            writer.write(0, np.zeros((2, 8, 8)))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write(tmp_path, monkeypatch):
    target = tmp_path / "run_it001_data.star"
    assert temp_path_for(target).name == f".run_it001_data.tmp{os.getpid()}.star"
    with pytest.raises(ValueError):
        with atomic_write(target) as tmp:
            tmp.write_text("partial")
            raise ValueError("fail")
    assert list(tmp_path.iterdir()) == []

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full_disk)
    with pytest.raises(CryoInputError, match="disk is full") as info:
        with atomic_write(target) as tmp:
            tmp.write_text("x")
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_unwritable_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(CryoInputError, match="not writable") as info:
            write_map(folder / "m.mrc", np.zeros((4, 4, 4)), 1.0)
        assert "ro" in str(info.value)
    finally:
        folder.chmod(0o700)


def test_permission_denied_is_user_error(tmp_path, monkeypatch):
    import cryorefine.io.mrc as mrc_module

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(mrc_module.mrcfile, "new", denied)
    with pytest.raises(CryoInputError, match="not writable") as info:
        write_map(tmp_path / "m.mrc", np.zeros((4, 4, 4)), 1.0)
    assert str(tmp_path) in str(info.value)


def test_missing_output_folder(tmp_path):
    with pytest.raises(CryoInputError, match="does not exist"):
        write_stack(tmp_path / "no" / "s.mrcs", np.zeros((1, 4, 4)), 1.0)


def test_nonstandard_header_falls_back_with_warning(tmp_path):
    path = tmp_path / "noid.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(np.ones((4, 4, 4), np.float32))
    raw = bytearray(path.read_bytes())
    raw[208:212] = b"    "  # blank the 'MAP ' ID, as some old programs write
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="not standard"):
        data, _ = read_map(path)
    assert data.shape == (4, 4, 4)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_image_handler") is None, reason="RELION not installed")
def test_relion_reads_our_map(tmp_path):
    data = np.zeros((8, 8, 8), np.float32)
    data[4, 4, 4] = 8.0
    write_map(tmp_path / "m.mrc", data, 1.5)
    result = subprocess.run(
        ["relion_image_handler", "--i", str(tmp_path / "m.mrc"), "--stats"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1.5" in result.stdout  # RELION reports the voxel size from our header
