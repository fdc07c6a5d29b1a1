"""The output lock: ``<output prefix>.lock`` (``Refine3D/run.lock`` for ``--o Refine3D/run``) is held while a run
writes under that prefix, so that a second run into it stops with one line instead of overwriting the first one's
files. RELION has no such lock.

The file is created atomically (``O_CREAT | O_EXCL``) and holds JSON: host, pid, start time and command line, and,
where the system has them, the boot id, the pid namespace and the process's start tick (``/proc``), which tell a
pid that was reused from the holder's. While held, the file's modification time is refreshed every
:data:`HEARTBEAT_S` seconds (a daemon thread).

A lock found in the way is **stale** (a killed run's, replaced with a warning) when

- it was written on this machine (same host name, boot and pid namespace) and its process is gone:
  ``os.kill(pid, 0)`` raises ProcessLookupError, or the pid now belongs to a process started later (pid reuse);
- it was written on this host name before the machine restarted (another boot id);
- it was written elsewhere (another host, or a pid namespace whose pids this process cannot see) and has had no
  heartbeat for :data:`STALE_AFTER_S` (6 h). That is generous on purpose: a live run on another node refreshes it
  every minute, so only a stopped one (suspended by the batch system, or on a hung file system) would lose it,
  while a wrongly taken lock would let two runs write the same files; a run known to be gone can be freed at once
  by deleting the file;
- it is empty or unreadable and older than :data:`UNREADABLE_GRACE_S` (its writer was killed between creating and
  filling it).

Anything else is live: :class:`RunLockedError`, one line naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from cryorefine.errors import CryoInputError

HEARTBEAT_S = 60.0  # the holder touches the file this often
STALE_AFTER_S = 6 * 3600.0  # another machine's lock is stale after this long without a heartbeat
UNREADABLE_GRACE_S = 60.0  # an empty or unreadable lock younger than this is being written


def lock_path(output_root) -> Path:
    """``<output prefix>.lock``, next to the run's outputs."""
    return Path(f"{output_root}.lock")


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (/proc/PID/stat field 22); None where unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat:
        return None
    try:
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace() -> int | None:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def this_process(command: str | None = None) -> dict:
    """What a lock taken by this process records."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv) if command is None else command,
        "boot_id": _read_text("/proc/sys/kernel/random/boot_id"),
        "pid_namespace": _pid_namespace(),
        "process_start": _proc_start(os.getpid()),
    }


def _pid_gone(pid: int, process_start: int | None) -> str | None:
    """Why process ``pid`` (started at ``process_start`` ticks, if known) has ended, or None while it runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} no longer exists"
    except PermissionError:  # another user's process: alive
        pass
    now = _proc_start(pid) if process_start is not None else None
    if now is not None and now != process_start:
        return f"process {pid} has ended (the pid belongs to a later process now)"
    return None


def stale_reason(holder: dict | None, age_s: float, here: dict, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why a lock holding ``holder`` (None: empty or unreadable), last touched ``age_s`` seconds ago, is stale, as
    judged by the process ``here`` (:func:`this_process`); None when it is live. The rule is the module's."""
    if holder is None:
        return f"empty or unreadable for {age_s:.0f} s" if age_s > UNREADABLE_GRACE_S else None
    if holder.get("host") == here["host"]:

        def differs(key):
            return holder.get(key) is not None and here.get(key) is not None and holder[key] != here[key]

        if differs("boot_id"):
            return f"host {here['host']} has restarted since"
        if not differs("pid_namespace"):
            try:
                pid = int(holder["pid"])
            except (KeyError, TypeError, ValueError):
                pid = 0
            if pid <= 0:  # os.kill would test a process group
                return "it names no process"
            return _pid_gone(pid, holder.get("process_start"))
    if age_s > stale_after_s:
        return f"no heartbeat from host {holder.get('host')} for {age_s / 3600:.1f} h"
    return None


def holder_words(holder: dict | None) -> str:
    """'pid N on host H, started T' of a lock's content (None: unreadable)."""
    if holder is None:
        return "its lock is still being written"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


class RunLockedError(CryoInputError):
    """A live run holds the lock: one line naming the lock file, its holder and the fix."""

    def __init__(self, path: Path, holder: dict | None):
        self.holder = holder
        prefix = str(path)[: -len(".lock")] if str(path).endswith(".lock") else str(path)
        super().__init__(
            f"another cryorefine run ({holder_words(holder)}) is writing to {prefix}; wait for it to finish, or pick "
            "another --o (if that run is gone, delete this file)",
            path=path,
        )


def _parse(raw: bytes) -> dict | None:
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``with RunLock(path): ...`` holds the lock file ``path`` (see the module); ``acquire`` raises
    :class:`RunLockedError` where a live run holds it and replaces a stale one (``replaced`` then holds the warning
    line). ``release`` (the ``with`` block's end, however it ends) removes the file if it is still this lock's."""

    def __init__(
        self,
        path,
        command: str | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.path = Path(path)
        self.command = command
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.replaced: str | None = None  # the warning when a stale lock was replaced
        self._content: bytes | None = None  # what this lock wrote, while held
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._content is not None

    def acquire(self) -> RunLock:
        here = this_process(self.command)
        content = (json.dumps(here, indent=1) + "\n").encode()
        holder = None
        for _ in range(5):  # each pass: create, else judge the lock in the way and set a stale one aside
            if self._create(content):
                self._content = content
                self._stop.clear()
                self._heartbeat = threading.Thread(target=self._beat, name="run-lock heartbeat", daemon=True)
                self._heartbeat.start()
                return self
            found = self._read()
            if found is None:  # released meanwhile
                continue
            raw, age_s = found
            holder = _parse(raw)
            reason = stale_reason(holder, age_s, here, self.stale_after_s)
            if reason is None:
                raise RunLockedError(self.path, holder)
            if self._set_aside(raw):
                self.replaced = (
                    f"{self.path}: replaced the stale lock of a run that is gone ({holder_words(holder)}): {reason}"
                )
        raise RunLockedError(self.path, holder)  # other runs kept taking it: as live

    def _create(self, content: bytes) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _read(self) -> tuple[bytes, float] | None:
        """The lock file's content and seconds since its last heartbeat; None if it is gone."""
        try:
            raw = self.path.read_bytes()
            age_s = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return raw, max(0.0, age_s)

    def _set_aside(self, raw: bytes) -> bool:
        """Remove the stale lock whose content is ``raw``. A rename first, so that of two runs replacing it at once
        one removes it; the other finds the first one's new lock there (other content) and puts it back."""
        aside = self.path.with_name(f".{self.path.name}.stale{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() == raw:
                return True
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            return False
        finally:
            aside.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:  # deleted by hand, or the file system is away for now
                pass

    def release(self) -> None:
        if self._content is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5.0)
            self._heartbeat = None
        try:
            if self.path.read_bytes() == self._content:  # not a lock another run took after this one was deleted
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._content = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
