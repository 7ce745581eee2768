"""Reading a run's tables (Parquet, JSONL, part directories) with column and finiteness checks; shards.
docs/DESIGN.md 3 and SCHEMAS.md."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import polars as pl
import pyarrow as pa

from stages.engine.errors import InputError

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
