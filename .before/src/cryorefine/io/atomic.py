"""Atomic file writes: write to a hidden temporary in the same folder, then rename."""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path

from cryorefine.errors import CryoInputError
from cryorefine.debug_hooks import pause_point

_USER_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EACCES: "the folder is not writable",
    errno.EROFS: "the file system is read-only",
    errno.EPERM: "the folder is not writable",
    errno.EDQUOT: "the disk quota is exceeded",
}


_TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)(\.[^.]+)?$")  # temp_path_for's names; group 1 is the writer's pid


def temp_path_for(path) -> Path:
    """`.{stem}.tmp{pid}{suffix}` next to `path` (the extension stays last for mrcfile/starfile)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporaries in `folder` whose writing process is gone (a killed run's); return them."""
    stale = [
        p
        for p in Path(folder).glob(".*.tmp*")
        if (m := _TEMP_NAME.match(p.name)) and not _process_exists(int(m.group(1)))
    ]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def user_os_error(exc: OSError, folder) -> CryoInputError | None:
    """A CryoInputError for OS errors the user can fix (full disk, no permission), else None."""
    reason = None if exc.errno is None else _USER_ERRNOS.get(exc.errno)
    if reason is None:
        return None
    return CryoInputError(
        f"cannot write here: {reason} ({exc.strerror}); free space or choose another output folder", path=folder
    )


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path; on success os.replace it onto `path`, on failure remove it."""
    path = Path(path)
    folder = path.parent.resolve()
    if not folder.is_dir():
        raise CryoInputError("output folder does not exist; create it first", path=folder)
    tmp = temp_path_for(path)
    try:
        yield tmp
        pause_point("write", path.name)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):
            err = user_os_error(exc, folder)
            if err is not None:
                raise err from exc
        raise
