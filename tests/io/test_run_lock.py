"""The output lock (io/run_lock.py): taken atomically with its holder's host, pid, start and command line; a live
holder refuses a second taker with one line naming the file and the fix; a stale lock (dead pid, restarted host, no
heartbeat from another host) is replaced with a warning; released however the holding block ends. Also its use by
a run (refine/context.output_lock) and the CLI's SIGTERM handler."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from cryorefine.cli.refine import sigterm_raises
from cryorefine.errors import CryoInputError, Terminated
from cryorefine.io.run_lock import (
    STALE_AFTER_S,
    UNREADABLE_GRACE_S,
    RunLock,
    RunLockedError,
    lock_path,
    stale_reason,
    this_process,
)
from cryorefine.refine.context import output_lock


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(path, **changes) -> dict:
    holder = {**this_process("cryorefine refine --o x"), **changes}
    path.write_text(json.dumps(holder))
    return holder


def test_lock_file_holds_the_holder_and_goes_at_the_end(tmp_path):
    path = lock_path(tmp_path / "Refine3D" / "run")
    assert path == tmp_path / "Refine3D" / "run.lock"
    path.parent.mkdir()
    with RunLock(path, command="cryorefine refine --o Refine3D/run") as lock:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["started"]
        assert holder["command"] == "cryorefine refine --o Refine3D/run"
        assert lock.held and lock.replaced is None
    assert not path.exists() and not lock.held


def test_live_lock_refuses_with_one_line(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path):
        before = path.read_bytes()
        with pytest.raises(RunLockedError) as err:
            RunLock(path).acquire()
        assert path.read_bytes() == before
    msg = str(err.value)
    assert "\n" not in msg and isinstance(err.value, CryoInputError)
    assert msg.startswith(f"{path}: another cryorefine run (pid {os.getpid()} on host ")
    assert f"is writing to {tmp_path / 'run'};" in msg and "--o" in msg


def test_lock_of_a_dead_process_is_replaced_with_a_warning(tmp_path):
    path = tmp_path / "run.lock"
    pid = dead_pid()
    write_lock(path, pid=pid, process_start=None)
    with RunLock(path) as lock:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert lock.replaced.startswith(f"{path}: replaced the stale lock") and f"pid {pid}" in lock.replaced
        assert "no longer exists" in lock.replaced
    assert not path.exists() and not list(tmp_path.iterdir())


def test_released_when_the_block_raises(tmp_path):
    path = tmp_path / "run.lock"
    with pytest.raises(ZeroDivisionError):
        with RunLock(path):
            1 / 0
    assert not path.exists()
    with pytest.raises(Terminated):  # SIGTERM under the CLI's handler, as a killed batch job gets it
        with sigterm_raises(), RunLock(path):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert not path.exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_stale_rule():
    here = this_process()
    me = dict(here)
    assert stale_reason(me, 1e9, here) is None  # this process: alive, however old the file
    assert "no longer exists" in stale_reason({**me, "pid": dead_pid()}, 0.0, here)
    if me["process_start"] is not None:  # the pid alive but started later than the holder: reused
        assert "later process" in stale_reason({**me, "process_start": me["process_start"] - 1}, 0.0, here)
    if me["boot_id"] is not None:
        assert "restarted" in stale_reason({**me, "boot_id": "another-boot"}, 0.0, here)
    elsewhere = {**me, "host": "node-elsewhere", "pid": dead_pid()}  # its pid says nothing here: age decides
    assert stale_reason(elsewhere, STALE_AFTER_S - 60, here) is None
    assert "no heartbeat from host node-elsewhere" in stale_reason(elsewhere, STALE_AFTER_S + 60, here)
    if me["pid_namespace"] is not None:  # same host name, pids of another namespace (a container): age decides
        other_ns = {**me, "pid": dead_pid(), "pid_namespace": -1}
        assert stale_reason(other_ns, 10.0, here) is None and stale_reason(other_ns, STALE_AFTER_S + 1, here)
    assert stale_reason(None, 1.0, here) is None  # being written
    assert "unreadable" in stale_reason(None, UNREADABLE_GRACE_S + 1, here)


def test_unreadable_lock(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text("")
    with pytest.raises(RunLockedError, match="still being written"):
        RunLock(path).acquire()
    old = time.time() - UNREADABLE_GRACE_S - 10
    os.utime(path, (old, old))
    with RunLock(path) as lock:
        assert "unreadable" in lock.replaced


def test_heartbeat_and_release_keep_another_runs_lock(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path, heartbeat_s=0.05):
        old = time.time() - 3600
        os.utime(path, (old, old))
        deadline = time.time() + 5
        while path.stat().st_mtime < time.time() - 60 and time.time() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > time.time() - 60, "the holder refreshes the file's time"
        path.unlink()  # deleted by hand; another run takes the prefix
        theirs = write_lock(path, pid=os.getppid())
    assert json.loads(path.read_text()) == theirs


def cfg(root):
    return SimpleNamespace(output_root=str(root), device="cpu")


def test_run_holds_the_lock_and_logs_a_replaced_one(tmp_path):
    root = tmp_path / "Class3D" / "run"
    with output_lock(cfg(root), None):  # makes the folder
        assert lock_path(root).exists()
        with pytest.raises(CryoInputError, match="run.lock: another cryorefine run"):
            with output_lock(cfg(root), None):
                pass
    assert not lock_path(root).exists()
    pid = dead_pid()
    write_lock(lock_path(root), pid=pid)
    with pytest.raises(RuntimeError):
        with output_lock(cfg(root), None):
            raise RuntimeError("a failed run")
    assert not lock_path(root).exists()
    log = (root.parent / "run.log").read_text().splitlines()
    assert len(log) == 1 and f"warning: {lock_path(root)}: replaced the stale lock" in log[0] and f"pid {pid}" in log[0]
