"""Atomic writes: a temp file in the same folder, fsync, rename (a crash never leaves half a file); folders
committed the same way; content hashes.  docs/DESIGN.md 3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from stages.engine.errors import FS_ERRNOS, write_failed

def fsync_dir(path: Path) -> None:
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
        if e.errno in FS_ERRNOS:
            raise write_failed(path, e) from None
        raise
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except (FileNotFoundError, OSError):
                pass
    fsync_dir(path.parent)
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


def _umask_modes(root: Path) -> None:
    """Give a staged folder the modes mkdir / open() would: writers that stage through mkstemp / mkdtemp
    (transformers' ``save_pretrained`` writes ``model.safetensors`` 0600) would otherwise leave files only their
    owner can read in a folder the user's umask says to share.  Execute bits are kept where a file had them."""
    mask = current_umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        if p.is_dir():
            p.chmod(0o777 & ~mask)
        elif p.is_file():
            p.chmod((0o666 | (p.stat().st_mode & 0o111)) & ~mask)


def commit_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Swap a complete staged folder ``tmp`` into ``path``: the old folder is renamed away first and deleted
    after, so ``path`` is at every moment either the old complete folder or the new one (checkpoints, models)."""
    tmp, path = Path(tmp), Path(path)
    _umask_modes(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
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
