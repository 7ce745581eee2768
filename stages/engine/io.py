"""Tables, atomic writes, manifests and the input-error contract shared by every stage.

Every stage writes ``<run_dir>/<stage>.parquet`` (or a directory of part files when sharded) plus
``<run_dir>/<stage>.manifest.json``.  Writes go to a temporary file in the same directory, are fsynced
and renamed into place, so a crash never leaves a half-written table behind.  A rerun whose manifest
matches (same stage, config and input hashes) is skipped; a rerun whose inputs or config changed is
refused unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

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


class StageSkipped(Exception):
    """Raised internally when a stage's manifest matches and nothing needs doing."""


# --------------------------------------------------------------------------------------------------
# atomic writes


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


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> Path:
    """Write to a temp file in the same folder, fsync, then rename into place.

    ``exclusive=True`` never replaces an existing file (hard link instead of rename; FileExistsError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
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
# manifests and resume


def versions() -> dict[str, str]:
    out = {"sgsd": SGSD_VERSION, "python": platform.python_version()}
    for mod in ("torch", "transformers", "polars", "pyarrow", "vllm", "peft", "math_verify"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
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
        self.run_dir = Path(self.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.input_hashes = {
            k: (file_hash(v) if v is not None and Path(v).exists() else None) for k, v in self.inputs.items()
        }
        self.config_json = to_jsonable(self.config)
        self.done = self._check()

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

    def finish(self, table: pl.DataFrame | None, extra: Mapping[str, Any] | None = None, rows: int | None = None) -> Path:
        if table is not None:
            write_parquet(table, self.output)
            rows = table.height if rows is None else rows
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


def shard_output_name(stage: str, shard: tuple[int, int]) -> str:
    """Output name of one shard: ``<stage>`` unsharded, ``<stage>/part-0000i-of-0000n`` sharded."""
    i, n = shard
    return stage if n == 1 else f"{stage}/part-{i:05d}-of-{n:05d}"
