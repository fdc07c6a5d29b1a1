"""`cryorefine` command line: one module per subcommand, each with add_args(parser) and main(args)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from typing import NoReturn

from ..errors import CryoInputError, DistributedError, Terminated
from ..gc_pauses import imports_without_collections

SUBCOMMANDS = {
    "demo": "Simulate a small set from the packaged 6msm model, refine it and report resolution and pose error",
    "refine": "3D auto-refine (gold-standard MAP-EM), like relion_refine --auto_refine",
    "classify": "3D classification into K classes, like relion_refine --K",
    "simulate": "Simulate particles from an atomic model or a map (truth kept)",
    "reconstruct": "Reconstruct a map from particles with known poses, like relion_reconstruct",
    "convert": "Convert a cryoSPARC particle file (.cs) into a RELION 3.1 STAR file",
    "fsc": "Fourier shell correlation between two maps",
    "evaluate": "Pose and map errors of a refinement against the truth",
    "external": "Run refine or classify as a RELION External job (its flags in, its output nodes and exit files out)",
}


_OS_ERROR_FIXES = {  # user-fixable OS errors: strerror (which says what happened) + the fix
    errno.ENOSPC: "free space or choose another output folder with --o",
    errno.EDQUOT: "free space or choose another output folder with --o",
    errno.EACCES: "make it accessible or choose another output folder with --o",
    errno.EROFS: "choose another output folder with --o",
}


def _say(line: str) -> None:
    """One line on stderr in one write: the ranks of a torchrun job print theirs at once, and print's separate write
    of the newline let them run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def _warnings_held() -> Iterator[list]:
    """Hold the warnings raised while a command runs and show them (as Python would have) when it ends. The caller
    empties the list when a CryoInputError stops the command: its one-line error says what to fix, and a warning about
    the same input (an MRC header read anyway) would only add lines before it."""
    held: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as held:
            yield held
    finally:
        _show(held)


def _show(held: list) -> None:
    """Show the held warnings now, before a run's last line (how it stopped), and let go of them. (Written out here:
    inside _warnings_held, warnings.showwarning is the recorder that appends to ``held``.)"""
    for w in held:
        sys.stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line))
    sys.stderr.flush()
    held.clear()


def _gpu_out_of_memory():
    """torch.cuda.OutOfMemoryError (a class that never matches where torch lacks it)."""
    try:
        import torch

        return torch.cuda.OutOfMemoryError
    except (ImportError, AttributeError):
        return type("_NoOutOfMemoryError", (Exception,), {})


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's lines; shows "(default: X)" where there is one (not for off flags or unset options)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cryorefine",
        description="Cryo-EM 3D refinement by regularised likelihood (RELION's MAP-EM) on PyTorch.",
        epilog="`cryorefine COMMAND --help` lists every option of a command, with its units (Å, pixels, "
        "degrees) and default.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f"cryorefine.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"cryorefine.cli.{name}":
                continue
            raise
        p = sub.add_parser(
            name, help=help_text, description=(module.__doc__ or help_text).strip(), formatter_class=_HelpFormatter
        )
        module.add_args(p)
        # each option's flag and default by destination: what --continue compares a command line with
        options = {a.dest: (a.option_strings[0] if a.option_strings else a.dest, a.default) for a in p._actions}
        p.set_defaults(_main=module.main, _options=options)
    return parser


def _huge_pages_for_large_tensors() -> None:
    """Ask PyTorch's CPU allocator to back tensors of 2 MiB and more with transparent huge pages (THP_MEM_ALLOC_ENABLE,
    read at its first large allocation), unless the user has set it. A CPU E-step allocates its tiles' temporaries
    afresh, each page faulted in and zeroed by the kernel: on 4 KiB pages, as much system time as computation."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv=None, frozen_imports: bool = False) -> int:
    """Run the command line ``argv`` (default sys.argv); returns the exit code. ``frozen_imports``: the subcommands'
    imports without the garbage collector's pauses, their objects frozen (gc_pauses.py; the `cryorefine` program)."""
    _huge_pages_for_large_tensors()
    # the program's own process only: an in-process caller's garbage (tests: earlier runs' tensors) is not frozen
    with imports_without_collections() if frozen_imports else contextlib.nullcontext():
        parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_main"):
        parser.print_help()
        return 2
    with _warnings_held() as held:
        return _run(args, held)


def _run(args, held: list) -> int:
    try:
        try:
            rc = args._main(args)
        except _gpu_out_of_memory() as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
            raise CryoInputError(
                f"the GPU ran out of memory ({first[:160]}); pass a smaller --batch "
                "(e.g. half the last one) or use a GPU with more memory"
            ) from exc
    except CryoInputError as exc:
        held.clear()
        _say(f"cryorefine {args.command}: error: {exc}")
        return 2
    except DistributedError as exc:
        _show(held)
        _say(f"cryorefine {args.command}: error: {exc}")
        return 1
    except OSError as exc:
        fix = None if exc.errno is None else _OS_ERROR_FIXES.get(exc.errno)
        if fix is None:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _say(f"cryorefine {args.command}: error: {where}{exc.strerror or exc}; {fix}")
        return 2
    except KeyboardInterrupt as exc:
        _show(held)
        how = "stopped by SIGTERM" if isinstance(exc, Terminated) else "interrupted"
        _say(f"cryorefine {args.command}: {how}; rerun with --continue to resume from the last finished iteration")
        return 143 if isinstance(exc, Terminated) else 130
    return int(rc or 0)


def console() -> NoReturn:
    """The `cryorefine` program (its console entry point, and `python -m cryorefine.cli.main`): main(), then the
    process ends at once with its code. By then main() has closed every file, thread and worker process of ours; what
    the interpreter would still do is free torch's (and CUDA's) state module by module: 0.8 s on a 2-core CPU, for
    nothing. Not for callers of main() in-process (tests, scripts), whose interpreter goes on."""
    rc = main(frozen_imports=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    console()
