"""`cryorefine --help` and every subcommand's help: each option has a help text, physical quantities name their
unit, and defaults are shown. The table below is the reference: every option must be listed in it, so a new
option has to be classified (and, if physical, documented with its unit) before this test passes."""

import argparse
import re

import pytest

from cryorefine.cli.main import SUBCOMMANDS, build_parser

# option -> the unit its help must name
UNITS = {
    "--gpu_memory": "GiB",
    "--ini_high": "Å",
    "--maxres": "Å",
    "--strict_highres_exp": "Å",
    "--particle_diameter": "Å",
    "--low_resol_join_halves": "Å",
    "--angpix": "Å",
    "--defocus_min": "Å",
    "--defocus_max": "Å",
    "--astigmatism": "Å",
    "--max_shift": "Å",
    "--bfactor": "Å²",
    "--offset_range": "pixels",
    "--offset_step": "pixels",
    "--box": "pixels",
    "--sigma_ang": "degrees",
    "--sigma_rot": "degrees",
    "--sigma_tilt": "degrees",
    "--sigma_psi": "degrees",
    "--healpix_order": "°",
    "--auto_local_healpix_order": "°",
    "--incr_size": "shells",
    "--max_seconds": "seconds",
    "--dist_timeout": "seconds",
    "--offset": "Å",
    "--min_sigma2_offset": "Å²",
    "--randomize_at_A": "Å",
    "--voltage": "kV",
    "--cs": "mm",
    "--beam_tilt": "mrad",
    "--defocus_spread": "Å",
    "--optics": "Å",
}
# options without a physical unit: counts, switches, files, names, dimensionless factors
NO_UNIT = {
    "--i",
    "--o",
    "--ref",
    "--sym",
    "--skip_gridding",
    "--solvent_mask",
    "--solvent_correct_fsc",
    "--flatten_solvent",
    "--zero_mask",
    "--ctf",
    "--norm",
    "--scale",
    "--firstiter_cc",
    "--pad",
    "--maxsig",
    "--random_seed",
    "--seed",
    "--perturb",
    "--adaptive_fraction",
    "--tau2_fudge",
    "--iter",
    "--batch",
    "--gpu",
    "--j",
    "--continue",
    "--auto_refine",
    "--split_random_halves",
    "--K",
    "--n",
    "--snr",
    "--model",
    "--no_ctf",
    "--subset",
    "--project_dir",
    "--copy",
    "--data",
    "--truth",
    "--map",
    "--truth_map",
    "map1",
    "map2",
    "--mask",
    "--ctf_intact_first_peak",
    "--skip_align",
    "--skip_rotate",
    "--ctf_phase_flipped",
    "--only_flip_phases",
    "--mag_matrix",
    "--odd_zernike",
    "--even_zernike",
    "--randomize_at_fsc",
    "--force_mask",
    "program",
    "options",
    "cs",
    "star",
    "--pool",
    "--oversampling",
    "--poses",
    "--precision",
    "--no_image_cache",
    "--preread_images",
    "--scratch_dir",
    "--micrographs",
    "--mic_scale",
    "--model_noise",
    "--junk",
    "--junk_map",
    "--preferred_view",
    "--uniform_fraction",
}


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def options(p):
    return [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def test_top_level_help_lists_every_subcommand():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert re.search(rf"^\s+{name}\b", text, re.M), name
    assert "COMMAND --help" in text


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_option_has_help_with_its_unit_and_default(command):
    p = subparsers()[command]
    text = " ".join(p.format_help().split())  # one line, whatever the terminal width
    for a in options(p):
        name = a.option_strings[0] if a.option_strings else a.dest
        assert a.help and len(a.help) > 10, f"{command} {name}: no help"
        assert (name in UNITS) != (name in NO_UNIT), f"{command} {name}: classify it in UNITS or NO_UNIT"
        if name in UNITS:
            assert UNITS[name] in a.help, f"{command} {name}: the help must name the unit {UNITS[name]}"
        if a.default not in (None, False):
            assert f"(default: {a.default})" in text, f"{command} {name}: default {a.default} not shown"
