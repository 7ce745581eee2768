"""Tables, atomic writes, manifests and the input-error contract shared by every stage.

Every stage writes ``<run_dir>/<stage>.parquet`` (or a directory of part files when sharded) plus
``<run_dir>/<stage>.manifest.json``.  Writes go to a temporary file in the same directory, are fsynced
and renamed into place, so a crash never leaves a half-written table behind.  A rerun whose manifest
matches (same stage, config and input hashes) is skipped; a rerun whose inputs or config changed is
refused unless ``force`` is given.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import re
import sys
import json
import os
import platform
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

SGSD_VERSION = "0.1.0"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _data_dir() -> Path:
    """The bundled ``data/`` folder: the checkout's, or the ``sgsd_data`` package of an installed wheel."""
    if (REPO_ROOT / "data" / "benchmarks.toml").is_file():
        return REPO_ROOT / "data"
    import importlib.util

    spec = importlib.util.find_spec("sgsd_data")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return REPO_ROOT / "data"


DATA_DIR = _data_dir()


class InputError(Exception):
    """Bad user input: reported as one line naming the file and the problem, exit code 2."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

    def __reduce__(self):  # picklable: an error raised in a worker process reaches the parent intact
        return (type(self), (self.path, self.problem))


class StageSkipped(Exception):
    """Raised internally when a stage's manifest matches and nothing needs doing."""


# control characters (C0 but newline and tab, DEL, C1) and the bidirectional overrides: what model or bank text
# must not send to a terminal as is (escape sequences set the window title, write the clipboard, clear the screen)
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def visible(text: str) -> str:
    """``text`` with every control character replaced by a visible escape (ESC -> ``\\x1b``, U+202E ->
    ``\\u202e``); newlines and tabs stay.  For text printed to a terminal."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                           text)


# --------------------------------------------------------------------------------------------------
# atomic writes


_FS_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
              errno.EFBIG}


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteError(InputError):
    """A write that failed (read-only or full file system, permissions): one line naming the file."""


def write_failed(path: str | os.PathLike, e: OSError) -> WriteError:
    why = e.strerror or type(e).__name__
    return WriteError(path, f"cannot write ({why}); nothing was replaced")


_FS_MESSAGES = (("No space left on device", "No space left on device"), ("os error 28", "No space left on device"),
                ("Read-only file system", "Read-only file system"), ("os error 30", "Read-only file system"),
                ("Disk quota exceeded", "Disk quota exceeded"), ("PytorchStreamWriter failed", "write failed, disk full?"),
                ("file write failed", "write failed, disk full?"))


def as_write_error(e: BaseException, path: str | os.PathLike) -> WriteError | None:
    """A failed write from any library (OSError, safetensors' SafetensorError, torch's RuntimeError) as a
    WriteError naming ``path``; None when ``e`` is not a file-system fault."""
    if isinstance(e, WriteError):
        return e
    if isinstance(e, OSError) and e.errno in _FS_ERRNOS:
        return write_failed(getattr(e, "filename", None) or path, e)
    text = str(e)
    for needle, why in _FS_MESSAGES:
        if needle in text:
            return WriteError(path, f"cannot write ({why}); nothing was replaced")
    return None


def current_umask() -> int:
    """The process's umask, read without changing it (``/proc/self/status``; else set and restored at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> Path:
    """Write to a temp file in the same folder, fsync, then rename into place.

    ``exclusive=True`` never replaces an existing file (hard link instead of rename; FileExistsError).
    A failing write (full disk, read-only file system) raises :class:`WriteError` naming ``path`` and leaves
    the previous file and no temp file behind."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 0600: give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno in _FS_ERRNOS:
            raise write_failed(path, e) from None
        raise
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except (FileNotFoundError, OSError):
                pass
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_parquet(df: pl.DataFrame | pa.Table, path: str | os.PathLike) -> Path:
    """Write a table atomically (temp file + fsync + rename)."""
    table = df.to_arrow() if isinstance(df, pl.DataFrame) else df
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return atomic_write_bytes(path, buf.getvalue())


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


# --------------------------------------------------------------------------------------------------
# reading tables

_POLARS_KIND = {
    str: (pl.Utf8, pl.String, pl.Categorical),
    int: (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64),
    float: (pl.Float32, pl.Float64, pl.Int8, pl.Int16, pl.Int32, pl.Int64),
    bool: (pl.Boolean,),
    list: (pl.List,),
}


def _dtype_ok(dtype: pl.DataType, want: type) -> bool:
    kinds = _POLARS_KIND[want]
    return any(dtype == k or dtype.base_type() == k for k in kinds)


def read_table(
    path: str | os.PathLike,
    required: Mapping[str, type] | None = None,
    *,
    allow_empty: bool = False,
) -> pl.DataFrame:
    """Read a Parquet file, a directory of Parquet part files, or a JSONL/JSON file.

    ``required`` maps column names to python kinds (str, int, float, bool, list); a missing column, a
    wrong type, an empty table or an unreadable file raises :class:`InputError` naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file not found")
    try:
        if path.is_dir():
            parts = sorted(p for p in path.glob("*.parquet") if not p.name.startswith("."))
            if not parts:
                raise InputError(path, "directory holds no .parquet part files")
            df = pl.concat([pl.read_parquet(p) for p in parts], how="vertical_relaxed")
        elif path.suffix in (".jsonl", ".ndjson"):
            df = _read_jsonl(path)
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise InputError(path, "a .json table must be a list of objects")
            df = pl.DataFrame(data, infer_schema_length=None)
        else:
            df = pl.read_parquet(path)
    except InputError:
        raise
    except (pl.exceptions.ComputeError, pa.ArrowInvalid, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(path, f"not a readable table ({msg[:160]})") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON at line {e.lineno}: {e.msg}") from None
    except Exception as e:  # polars raises a zoo of error types on corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(path, f"not a readable table ({type(e).__name__}: {msg[:160]})") from None
    if df.height == 0 and not allow_empty:
        raise InputError(path, "table is empty")
    check_columns(df, required or {}, path)
    return df


def _read_jsonl(path: Path) -> pl.DataFrame:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(path, f"line {i} is not valid JSON ({e.msg})") from None
            if not isinstance(rows[-1], dict):
                raise InputError(path, f"line {i} is not a JSON object")
    if not rows:
        return pl.DataFrame()
    return pl.DataFrame(rows, infer_schema_length=None)


def check_columns(df: pl.DataFrame, required: Mapping[str, type], path: str | os.PathLike | None) -> None:
    for col, kind in required.items():
        if col not in df.columns:
            raise InputError(path, f"missing column '{col}' (has: {', '.join(df.columns) or 'none'})")
        if not _dtype_ok(df.schema[col], kind):
            raise InputError(path, f"column '{col}' has type {df.schema[col]}, expected {kind.__name__}")


def check_finite(df: pl.DataFrame, columns: Iterable[str], path: str | os.PathLike | None, key: str | None = None,
                 *, nulls_ok: bool = False) -> None:
    """Refuse NaN or +-inf (and null, unless ``nulls_ok``) in float and float-list columns (InputError naming the row)."""
    for col in columns:
        if col not in df.columns:
            continue
        dt = df.schema[col]
        if isinstance(dt, pl.List):
            if not dt.inner.is_float():
                continue
            elem = pl.col(col).list.eval(~pl.element().is_finite().fill_null(False))
            bad = elem.list.any().fill_null(False)
            if not nulls_ok:
                bad = bad | pl.col(col).is_null()
        elif dt.is_float():
            bad = ~pl.col(col).is_finite().fill_null(nulls_ok)
        else:
            continue
        hit = df.with_row_index("_row").filter(bad)
        if hit.height:
            r = hit.row(0, named=True)
            where = f"{key} '{r[key]}'" if key and key in r else f"row {r['_row']}"
            raise InputError(path, f"column '{col}' holds a non-finite value (NaN, inf or null) in {hit.height} "
                                   f"row(s) (first: {where})")


def commit_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Swap a complete staged folder ``tmp`` into ``path``: the old folder is renamed away first and deleted
    after, so ``path`` is at every moment either the old complete folder or the new one (checkpoints, models)."""
    tmp, path = Path(tmp), Path(path)
    if path.exists():
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of every part file of a directory (names + contents)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# run-directory lock, stale temp files, writability

LOCK_NAME = ".sgsd.lock"
# temp names this package creates: atomic writes (.<name>.XXXXXXXX.tmp), checkpoint and model folders being
# written or swapped (.<name>.partial, .<name>.old, .<name>.new, .<name>.XXXXXXXX from mkdtemp)
_STALE_FILE_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$|^\..+\.new$")
_STALE_DIR_RE = re.compile(r"^\..+\.(?:partial|old|new)$|^\..+\.[A-Za-z0-9_]{8}$")
_HELD: dict[str, list] = {}  # resolved run dir -> [fd, depth] locks this process holds


def _holder_info(command: str) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _lock_holder(lock: Path) -> dict:
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
    h = _lock_holder(lock)
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


# --------------------------------------------------------------------------------------------------
# manifests and resume


def versions() -> dict[str, str]:
    out = {"sgsd": SGSD_VERSION, "python": platform.python_version()}
    for mod in ("torch", "transformers", "polars", "pyarrow", "vllm", "peft", "math_verify"):
        try:
            m = __import__(mod)
            v = getattr(m, "__version__", None)
            if v is None:  # e.g. math_verify: the installed distribution's version
                from importlib import metadata

                v = metadata.version(mod.replace("_", "-"))
            out[mod] = v
        except Exception:
            pass
    return out


@dataclass
class StageRun:
    """One stage invocation inside a run directory: output paths, manifest check, resume.

    Usage::

        run = StageRun(run_dir, "rollout", config=cfg, inputs={"problems": path}, force=force)
        if run.done:          # manifest matches: skip
            return run.output
        ... compute df ...
        run.finish(df, rows=df.height)
    """

    run_dir: Path
    stage: str
    config: Any
    inputs: dict[str, Any] = field(default_factory=dict)
    force: bool = False
    seed: int | None = None
    output_name: str | None = None

    def __post_init__(self) -> None:
        import weakref

        self.run_dir = Path(self.run_dir)
        # writable? not in use by another process? (before any work); stale temp files of a killed run go
        self._release = lock_run_dir(self.run_dir, command=None)
        weakref.finalize(self, self._release)
        self.t0 = time.time()
        self.input_hashes = {
            k: (file_hash(v) if v is not None and Path(v).exists() else None) for k, v in self.inputs.items()
        }
        self.config_json = to_jsonable(self.config)
        try:
            self.done = self._check()
        except BaseException:
            self._release()
            raise
        if self.done:
            self._release()

    def release(self) -> None:
        """Let other processes use the run directory (done by :meth:`finish` and when the object is dropped)."""
        self._release()

    @property
    def name(self) -> str:
        return self.output_name or self.stage

    @property
    def output(self) -> Path:
        return self.run_dir / f"{self.name}.parquet"

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / f"{self.name}.manifest.json"

    def _key(self) -> dict:
        return {"stage": self.stage, "config": self.config_json, "input_hashes": self.input_hashes}

    def _check(self) -> bool:
        if not self.manifest_path.exists():
            return False
        try:
            old = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            raise InputError(self.manifest_path, "manifest is not valid JSON (delete it or pass --force)") from None
        same = {k: old.get(k) for k in ("stage", "config", "input_hashes")} == self._key()
        if same and self.output.exists() and old.get("complete", False):
            if old.get("output_hash") and file_hash(self.output) != old["output_hash"]:
                if self.force:
                    return False
                raise InputError(self.output, "output was modified after its manifest was written; pass --force to redo")
            return not self.force
        if self.force or not old.get("complete", False):
            return False
        diff = [k for k in ("config", "input_hashes") if old.get(k) != self._key()[k]]
        what = " and ".join("inputs" if d == "input_hashes" else d for d in diff) or "stage"
        raise InputError(
            self.manifest_path,
            f"{what} changed since the last '{self.stage}' run in this directory; pass --force to overwrite",
        )

    def finish(self, table: pl.DataFrame | None, extra: Mapping[str, Any] | None = None, rows: int | None = None,
               before_commit: Callable[[], None] | None = None) -> Path:
        """Write the table and then the manifest.  ``before_commit`` runs once the new table is complete on disk
        (staged beside the old one) and before it replaces the old table: train swaps its checkpoint there, so
        a failure up to that point leaves the previous table, checkpoint and manifest untouched."""
        if table is not None:
            if before_commit is None:
                write_parquet(table, self.output)
            else:
                staged = self.output.with_name(f".{self.output.name}.new")
                write_parquet(table, staged)
                before_commit()
                os.replace(staged, self.output)
                _fsync_dir(self.output.parent)
            rows = table.height if rows is None else rows
        elif before_commit is not None:
            before_commit()
        manifest = {
            **self._key(),
            "inputs": {k: (str(v) if v is not None else None) for k, v in self.inputs.items()},
            "output": str(self.output.name),
            "output_hash": file_hash(self.output) if self.output.exists() else None,
            "rows": rows,
            "seed": self.seed,
            "versions": versions(),
            "host": socket.gethostname(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.t0)),
            "wall_time_s": round(time.time() - self.t0, 3),
            "complete": True,
            **(dict(extra) if extra else {}),
        }
        atomic_write_json(self.manifest_path, manifest)
        self._release()
        return self.output


def read_manifest(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


def iter_jsonl(path: str | os.PathLike) -> Iterable[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def stage_table_path(run_dir: str | os.PathLike, name: str) -> Path:
    """``<run_dir>/<name>.parquet`` or, when the stage was sharded, the ``<run_dir>/<name>/`` part directory."""
    run_dir = Path(run_dir)
    single, parts = run_dir / f"{name}.parquet", run_dir / name
    if single.exists():
        return single
    if parts.is_dir():
        return parts
    raise InputError(single, f"not found (run the '{name.replace('_', '-')}' stage first, or pass its file)")


def shard_bounds(rows: int, shard: tuple[int, int]) -> tuple[int, int]:
    """Rows [lo, hi) of shard i/n: the i-th of n contiguous, near-equal blocks, so the part files read in
    order (``part-00000`` first) give the rows of the unsharded table in the unsharded order."""
    i, n = shard
    return i * rows // n, (i + 1) * rows // n


def shard_rows(df: pl.DataFrame, shard: tuple[int, int]) -> pl.DataFrame:
    """The rows of shard i/n of ``df`` (:func:`shard_bounds`)."""
    lo, hi = shard_bounds(df.height, shard)
    return df.slice(lo, hi - lo)


def shard_output_name(stage: str, shard: tuple[int, int]) -> str:
    """Output name of one shard: ``<stage>`` unsharded, ``<stage>/part-0000i-of-0000n`` sharded."""
    i, n = shard
    return stage if n == 1 else f"{stage}/part-{i:05d}-of-{n:05d}"
