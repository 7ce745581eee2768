"""The run-directory lock (one writer per run directory, nested runs included), stale temp files, writability.
docs/DESIGN.md 3."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import sys
import time
from pathlib import Path
from typing import Callable


from stages.engine.errors import InputError

LOCK_NAME = ".sgsd.lock"
# temp names this package creates: atomic writes (.<name>.XXXXXXXX.tmp), checkpoint and model folders being
# written or swapped (.<name>.partial, .<name>.old, .<name>.new, .<name>.XXXXXXXX from mkdtemp)
_STALE_FILE_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\..+\.new$")
_STALE_DIR_RE = re.compile(r"^\..+\.(?:partial|old|new)$|^\..+\.[A-Za-z0-9_]{8}$")
_HELD: dict[str, list] = {}  # resolved run dir -> [fd, depth] locks this process holds


def lock_holder(lock: Path) -> dict:
    """pid / host / command / since of the process holding ``lock`` (from /proc/locks; the lock file itself
    stays empty, so a run directory is byte-identical whether or not a run was refused or crashed in it)."""
    try:
        st = os.stat(lock)
        ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        pid = None
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:
                    continue  # a process waiting for the lock
                if len(parts) >= 6 and parts[5] == ino:
                    pid = int(parts[4])
                    break
        if pid is None:
            return {}
        h = {"pid": pid, "host": socket.gethostname()}
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            h["command"] = " ".join(c.decode(errors="replace") for c in cmd if c)[:200]
            h["since"] = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(os.stat(f"/proc/{pid}").st_mtime))
        except OSError:
            pass
        return h
    except (OSError, ValueError):
        return {}


def _describe_holder(lock: Path) -> str:
    h = lock_holder(lock)
    if not h:
        return "another process"
    return f"pid {h.get('pid')} on {h.get('host')} ('{h.get('command', '?')}', since {h.get('since', '?')})"


def check_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create ``run_dir`` if needed and make sure it is a writable directory (before any work starts)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "run directory is a file, not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise InputError(run_dir, "run directory (or a parent) is a file, not a directory") from None
    except OSError as e:
        raise InputError(run_dir, f"cannot create the run directory ({e.strerror or type(e).__name__})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise InputError(run_dir, "run directory is not writable (permission denied)")
    return run_dir


def _held_by_me(run_dir: Path) -> str | None:
    for p in (run_dir, *run_dir.parents):
        if str(p) in _HELD:
            return str(p)
    return None


_WAIT = "wait for it to finish or use another run directory"
LOCK_SCAN_DEPTH = 4  # sub-folder levels searched for the locks of runs inside a run directory


def _shared_fd(lock: Path) -> int | None:
    """An fd holding a shared flock on ``lock``; None when another process holds it exclusively; -1 when it
    cannot be opened (then nothing is held)."""
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return -1
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _release_shared(fd: int) -> None:
    if fd >= 0:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _busy_below(run_dir: Path, depth: int = LOCK_SCAN_DEPTH) -> tuple[Path, str] | None:
    """(sub-folder, holder) of a run directory inside ``run_dir`` whose lock another process holds."""
    def walk(d: Path, level: int):
        try:
            entries = list(os.scandir(d))
        except OSError:
            return None
        for e in entries:
            if e.name.startswith(".") or e.is_symlink() or not e.is_dir():
                continue
            sub = Path(e.path)
            lock = sub / LOCK_NAME
            if str(sub) not in _HELD and lock.is_file():
                fd = _shared_fd(lock)
                if fd is None:
                    return sub, _describe_holder(lock)
                _release_shared(fd)
            if level < depth:
                found = walk(sub, level + 1)
                if found:
                    return found
        return None

    return walk(run_dir, 1)


def _claim_nested(run_dir: Path) -> list[int]:
    """Shared locks on the locks of the run directories around ``run_dir`` (its parents that have one), after
    checking that no run holds a folder inside it.  A run on R/step_0001 and a run on R then exclude each other
    whichever starts first: the later one finds the earlier one's lock (exclusive on its own folder, shared on
    the parents').  Returns the shared fds (released with the lock); InputError naming the holder otherwise."""
    held: list[int] = []
    try:
        for parent in run_dir.parents:
            lock = parent / LOCK_NAME
            if not lock.is_file():
                continue
            fd = _shared_fd(lock)
            if fd is None:
                raise InputError(run_dir, f"run directory is inside {parent}, which is in use by "
                                          f"{_describe_holder(lock)}; {_WAIT}")
            held.append(fd)
        busy = _busy_below(run_dir)
        if busy:
            raise InputError(run_dir, f"run directory holds {busy[0]}, which is in use by {busy[1]}; {_WAIT}")
    except BaseException:
        for fd in held:
            _release_shared(fd)
        raise
    return held


def run_dir_in_use(run_dir: str | os.PathLike) -> InputError | None:
    """Would :func:`lock_run_dir` refuse ``run_dir`` because another process holds it, a folder around it or one
    inside it?  Only looks (creates nothing, holds nothing): the CLI asks it before its heavy imports."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir() or _held_by_me(run_dir) is not None:
        return None
    lock = run_dir / LOCK_NAME
    if lock.is_file():
        fd = _shared_fd(lock)
        if fd is None:
            return InputError(run_dir, f"run directory is in use by {_describe_holder(lock)}; {_WAIT}")
        _release_shared(fd)
    try:
        for fd in _claim_nested(run_dir):
            _release_shared(fd)
    except InputError as e:
        return e
    return None


def lock_run_dir(run_dir: str | os.PathLike, command: str | None = None) -> Callable[[], None]:
    """Take the run directory's lock (``<run_dir>/.sgsd.lock``, flock); return the function that releases it.

    Re-entrant inside one process, and a lock on a folder covers its sub-folders (the loop's step dirs).
    Across processes the lock covers nested folders too: a run inside a locked folder, or around a folder
    another run holds, is refused.  Another process holding it -> InputError naming it (pid, host, command,
    since).  The kernel drops the lock when its process dies (kill -9), so a crashed run never blocks its rerun.
    Taking the lock also checks that the directory is writable and not full (one byte written and fsynced);
    on first acquisition the stale temp files of an earlier crashed write are removed (no live process can
    own them: every run inside or around this folder is excluded) and one line on stderr says what went.
    """
    run_dir = check_run_dir(run_dir).resolve()
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: the ranks of one job are one run; rank 0 holds the lock
        return lambda: None
    mine = _held_by_me(run_dir)
    if mine is not None:
        _HELD[mine][1] += 1
        return _releaser(mine)
    lock = run_dir / LOCK_NAME
    command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise InputError(run_dir, f"run directory is not writable ({e.strerror or type(e).__name__})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        busy = _busy_below(run_dir)  # held shared by a run inside it: name that run
        if busy:
            raise InputError(run_dir, f"run directory holds {busy[0]}, which is in use by {busy[1]}; {_WAIT}") from None
        raise InputError(run_dir, f"run directory is in use by {_describe_holder(lock)}; {_WAIT}") from None
    try:  # writable and not full? one byte written, fsynced, then removed again
        os.pwrite(fd, b"\n", 0)
        os.fsync(fd)
        os.ftruncate(fd, 0)
    except OSError as e:
        _unlock(fd)
        raise InputError(run_dir, f"run directory is not writable ({e.strerror or type(e).__name__})") from None
    try:
        around = _claim_nested(run_dir)
    except BaseException:
        _unlock(fd)
        raise
    _HELD[str(run_dir)] = [fd, 1, around]
    gone = clean_stale_temp(run_dir)
    if gone:
        names = ", ".join(str(p.relative_to(run_dir)) for p in gone[:4]) + (f" and {len(gone) - 4} more" if len(gone) > 4 else "")
        print(f"note: {run_dir}: removed {len(gone)} temp file(s) an interrupted run left: {names}", file=sys.stderr,
              flush=True)
    return _releaser(str(run_dir))


def _unlock(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)  # an idle run directory's lock file is empty (byte-identical between runs)
    except OSError:
        pass
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _releaser(key: str) -> Callable[[], None]:
    done = [False]

    def release() -> None:
        if done[0]:
            return
        done[0] = True
        entry = _HELD.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _HELD[key]
            for fd in entry[2]:
                _release_shared(fd)
            _unlock(entry[0])

    return release


@contextlib.contextmanager
def run_dir_lock(run_dir: str | os.PathLike, command: str | None = None):
    release = lock_run_dir(run_dir, command)
    try:
        yield Path(run_dir)
    finally:
        release()


def clean_stale_temp(run_dir: str | os.PathLike, depth: int = 3) -> list[Path]:
    """Remove the temp files / folders a killed write left (``.<name>.XXXXXXXX.tmp``, ``.<name>.partial`` ...).

    Only call it while holding the run directory's lock: then nobody is writing them.  ``depth`` levels of
    sub-folders are searched (step dirs, their checkpoints/ and eval/ folders)."""
    import shutil

    gone: list[Path] = []

    def walk(d: Path, level: int) -> None:
        try:
            entries = list(os.scandir(d))
        except OSError:
            return
        for e in entries:
            if e.is_symlink():
                continue
            if e.is_file() and _STALE_FILE_RE.match(e.name):
                try:
                    os.unlink(e.path)
                    gone.append(Path(e.path))
                except OSError:
                    pass
            elif e.is_dir():
                if _STALE_DIR_RE.match(e.name):
                    live = Path(d) / e.name[1:-len(".old")] if e.name.endswith(".old") else None
                    if live is not None and not live.exists():
                        os.replace(e.path, live)  # killed mid-swap: the previous folder goes back in place
                        continue
                    shutil.rmtree(e.path, ignore_errors=True)
                    gone.append(Path(e.path))
                elif level < depth and not e.name.startswith("."):
                    walk(Path(e.path), level + 1)

    walk(Path(run_dir), 0)
    return gone
