"""Benchmark registry and problem loading (docs/DESIGN.md 1.6; the registry data is ``data/benchmarks.toml``).

``load_problems(name_or_path)`` is the one entry point the stages use: it takes a registry name
(``aime25``, ``math500``, ``train`` ...) or a JSONL/JSON/Parquet file with ``id``, ``problem`` and
``answer`` columns and returns a table with those three columns (str), ids unique, answers non-empty.

A registry name is looked up in ``--data-dir``, then ``$SGSD_DATA_DIR``, then the folders listed in the
registry (``../shared/data`` beside the repository ...), then on the hub through ``datasets`` (imported
only then) when the registry fixes the row count (the same benchmark); an entry without one (the training
pool, whose hub entry is other data) is loaded from the hub only when named ``hub:NAME``.  When nothing works the error is one line saying where the file was looked for and why the
hub failed.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import polars as pl

from stages.engine.errors import InputError
from stages.engine.paths import DATA_DIR, REPO_ROOT
from stages.engine.tableio import read_table

REGISTRY_PATH = DATA_DIR / "benchmarks.toml"
ENV_DATA_DIR = "SGSD_DATA_DIR"
PROBLEM_COLUMNS = ("id", "problem", "answer")
HUB_PREFIX = "hub:"  # hub:NAME loads the registry entry's hub dataset even when a local file exists
TABLE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str = ""
    file: str | None = None
    rows: int | None = None
    in_all: bool = False
    aliases: tuple[str, ...] = ()
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "test"
    hub_columns: dict[str, str] = field(default_factory=dict)


@dataclass
class Problems:
    """A loaded problem table and where it came from (for manifests and messages)."""

    name: str
    df: pl.DataFrame
    source: str  # a file path or "hub:<id>[/<config>]:<split>"
    path: Path | None  # the local file, when there is one

    def content_hash(self) -> str:
        return problems_hash(self.df)


@lru_cache(maxsize=None)
def _registry(path: str = str(REGISTRY_PATH)) -> tuple[dict[str, Benchmark], tuple[str, ...]]:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(p, "benchmark registry not found") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(p, f"benchmark registry is not valid TOML ({e})") from None
    benches = {}
    for name, entry in data.get("benchmarks", {}).items():
        entry = dict(entry)
        entry["aliases"] = tuple(entry.get("aliases", ()))
        entry["hub_columns"] = dict(entry.get("hub_columns", {}))
        benches[name] = Benchmark(name=name, **entry)
    dirs = tuple(data.get("search", {}).get("data_dirs", ()))
    return benches, dirs


def registry() -> dict[str, Benchmark]:
    return _registry()[0]


BENCHMARKS: dict[str, Benchmark] = registry()


def known_benchmarks() -> list[str]:
    return sorted(registry())


def all_benchmarks() -> list[str]:
    """What ``--bench all`` means: the registry entries marked ``in_all``, in registry order."""
    return [b.name for b in registry().values() if b.in_all]


def get_benchmark(name: str) -> Benchmark:
    reg = registry()
    key = name.strip().lower()
    if key in reg:
        return reg[key]
    for b in reg.values():
        if key in b.aliases:
            return b
    raise InputError(None, f"unknown benchmark '{name}' (known: {', '.join(known_benchmarks())}; or pass a "
                           "JSONL/Parquet file with id, problem, answer)")


def expand_bench_names(names: list[str]) -> list[str]:
    """Resolve aliases and ``all``; keep order, drop duplicates; unknown names raise InputError."""
    out: list[str] = []
    for n in names:
        for part in (x for x in n.split(",") if x.strip()):
            resolved = all_benchmarks() if part.strip().lower() == "all" else [get_benchmark(part).name]
            out += [r for r in resolved if r not in out]
    return out


def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Local folders searched for benchmark files, in order."""
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get(ENV_DATA_DIR):
        dirs.append(Path(os.environ[ENV_DATA_DIR]))
    for d in _registry()[1]:
        p = Path(d).expanduser()
        dirs += [p] if p.is_absolute() else [REPO_ROOT / p, Path.cwd() / p]
    seen, out = set(), []
    for d in dirs:
        key = os.path.normpath(os.path.abspath(d))
        if key not in seen:
            seen.add(key)
            out.append(Path(key))
    return out


def is_bare_name(name_or_path: str | os.PathLike) -> bool:
    """A bare word (no folder separator, no table suffix, not a Path object): read as a registry name."""
    s = str(name_or_path)
    return not isinstance(name_or_path, Path) and "/" not in s and os.sep not in s and not s.endswith(TABLE_SUFFIXES)


# --------------------------------------------------------------------------------------------------
# loading


def load_problems(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> pl.DataFrame:
    """A benchmark name or a problems file -> DataFrame with columns id, problem, answer (all str)."""
    return load(name_or_path, data_dir=data_dir).df


def load(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
         allow_hub: bool = True) -> Problems:
    """Like :func:`load_problems`, also saying where the table came from.

    A bare word is a registry name (or alias); if it is no known name but an existing file of that name
    exists it is read as a file; otherwise the error lists the known names.  Anything else is a path.
    """
    if isinstance(name_or_path, str) and name_or_path.startswith(HUB_PREFIX):  # hub:NAME, the hub copy by name
        bench = get_benchmark(name_or_path[len(HUB_PREFIX):])
        if not bench.hub_id:
            raise InputError(None, f"benchmark '{bench.name}' has no hub dataset")
        if not allow_hub:
            raise InputError(None, f"benchmark '{name_or_path}': hub disabled")
        df = _load_from_hub(bench, "hub copy asked for by name")
        _check_rows(bench, df, bench.hub_id)
        return Problems(name=bench.name, df=df, source=hub_source(bench), path=None)
    if is_bare_name(name_or_path):
        try:
            bench = get_benchmark(str(name_or_path))
        except InputError:
            if not Path(name_or_path).is_file():
                raise
        else:
            return load_benchmark(bench, data_dir=data_dir, allow_hub=allow_hub)
    path = Path(name_or_path)
    df = validate_problems(read_table(path), path)
    return Problems(name=bench_name_for_file(path), df=df, source=str(path), path=path)


def bench_name_for_file(path: Path) -> str:
    stem = path.name
    for suf in TABLE_SUFFIXES:
        if stem.endswith(suf):
            stem = stem[: -len(suf)]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem).strip("._") or "problems"
    return safe


def find_local(bench: Benchmark, data_dir: str | os.PathLike | None = None) -> tuple[Path | None, list[Path]]:
    """(the first existing local file or None, the folders searched)."""
    dirs = search_dirs(data_dir)
    if not bench.file:
        return None, dirs
    for d in dirs:
        p = d / bench.file
        if p.is_file():
            return p, dirs
    return None, dirs


def load_benchmark(bench: Benchmark | str, data_dir: str | os.PathLike | None = None, *,
                   allow_hub: bool = True) -> Problems:
    if isinstance(bench, str):
        bench = get_benchmark(bench)
    path, dirs = find_local(bench, data_dir)
    if path is not None:
        df = validate_problems(read_table(path), path)
        _check_rows(bench, df, path)
        return Problems(name=bench.name, df=df, source=str(path), path=path)
    where = (f"{bench.file} not found in {', '.join(str(d) for d in dirs)}" if bench.file
             else "no local file (hub-only entry)")
    if not bench.hub_id:
        raise InputError(None, f"benchmark '{bench.name}': {where}, and it has no hub dataset")
    if bench.file and bench.rows is None:
        # the hub entry is other data (the training pool's is DAPO-Math-17k, not MATH 3-5 + AIME): the same
        # config must not train on different data on another machine, so it is used only when named
        raise InputError(None, f"benchmark '{bench.name}': {where}; set {ENV_DATA_DIR} (or --data-dir / "
                               f"loop.data_dir) to a folder holding {bench.file}, or name the hub copy "
                               f"({bench.hub_id}, other data) explicitly as '{HUB_PREFIX}{bench.name}'")
    if not allow_hub:
        raise InputError(None, f"benchmark '{bench.name}': {where} (hub disabled)")
    df = _load_from_hub(bench, where)
    _check_rows(bench, df, bench.hub_id)
    return Problems(name=bench.name, df=df, source=hub_source(bench), path=None)


def hub_source(bench: Benchmark) -> str:
    cfg = f"/{bench.hub_config}" if bench.hub_config else ""
    return f"hub:{bench.hub_id}{cfg}:{bench.hub_split}"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _load_from_hub(bench: Benchmark, where: str) -> pl.DataFrame:
    def fail(why: str) -> InputError:
        hint = f"pass --data-dir or set {ENV_DATA_DIR} to a folder holding {bench.file}" if bench.file else \
            "pass the problems as a file instead"
        return InputError(None, f"benchmark '{bench.name}': {where}; hub load of {bench.hub_id} failed "
                                f"({why}); {hint}")

    if _offline():
        raise fail("offline mode is set")
    try:
        import datasets  # noqa: F401  (optional dependency, imported only here)
    except ImportError:
        raise fail("the 'datasets' package is not installed") from None
    try:
        kw: dict[str, Any] = {"split": bench.hub_split}
        if bench.hub_config:
            ds = datasets.load_dataset(bench.hub_id, bench.hub_config, **kw)
        else:
            ds = datasets.load_dataset(bench.hub_id, **kw)
        rows = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    except Exception as e:  # network errors, missing splits, auth ...: one line, not a traceback
        msg = str(e).splitlines()[0] if str(e) else ""
        raise fail(f"{type(e).__name__}: {msg[:200]}") from None
    if not rows:
        raise fail("the split is empty")
    df = pl.DataFrame(rows, infer_schema_length=None)
    cols = bench.hub_columns
    src = f"hub:{bench.hub_id}"
    for key in ("problem", "answer"):
        if cols.get(key, key) not in df.columns:
            raise InputError(src, f"missing column '{cols.get(key, key)}' (has: {', '.join(df.columns)})")
    out = pl.DataFrame({
        "problem": df[cols.get("problem", "problem")],
        "answer": df[cols.get("answer", "answer")],
    })
    if cols.get("id"):
        if cols["id"] not in df.columns:
            raise InputError(src, f"missing column '{cols['id']}' (has: {', '.join(df.columns)})")
        ids = df[cols["id"]]
        out = out.with_columns(id=ids if ids.dtype == pl.String else ids.cast(pl.String))
    else:
        out = out.with_columns(id=pl.format("{}-{}", pl.lit(bench.name), pl.int_range(pl.len())))
    return validate_problems(out.select(PROBLEM_COLUMNS), src)


def _check_rows(bench: Benchmark, df: pl.DataFrame, where: Any) -> None:
    if bench.rows is not None and df.height != bench.rows:
        raise InputError(where, f"benchmark '{bench.name}' should have {bench.rows} rows, found {df.height} "
                                "(a partial or different copy?)")


def _answer_to_str(s: pl.Series) -> pl.Series:
    if s.dtype == pl.String:
        return s
    if s.dtype.is_float():
        # 27.0 -> "27", 0.5 -> "0.5"
        return pl.Series(s.name, [None if v is None else (str(int(v)) if float(v).is_integer() else repr(float(v)))
                                  for v in s.to_list()], dtype=pl.String)
    if s.dtype.is_integer() or s.dtype == pl.Boolean:
        return s.cast(pl.String)
    raise TypeError(str(s.dtype))


def validate_problems(df: pl.DataFrame, path: Any) -> pl.DataFrame:
    """Check and normalise a problems table: id, problem, answer present; ids unique; answers non-empty."""
    for col in PROBLEM_COLUMNS:
        if col not in df.columns:
            raise InputError(path, f"missing column '{col}' (has: {', '.join(df.columns) or 'none'}); a problems "
                                   "table needs id, problem and answer")
    if df.schema["problem"] != pl.String:
        raise InputError(path, f"column 'problem' has type {df.schema['problem']}, expected str")
    if df.schema["id"] != pl.String:
        if not df.schema["id"].is_integer():
            raise InputError(path, f"column 'id' has type {df.schema['id']}, expected str or int")
        df = df.with_columns(pl.col("id").cast(pl.String))
    try:
        df = df.with_columns(_answer_to_str(df["answer"]).alias("answer"))
    except TypeError:
        raise InputError(path, f"column 'answer' has type {df.schema['answer']}, expected str or a number") from None
    df = df.select(PROBLEM_COLUMNS).with_columns(pl.col("answer").str.strip_chars())
    for col in PROBLEM_COLUMNS:
        bad = df.filter(pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""))
        if bad.height:
            first = f"id {bad['id'][0]}" if col != "id" else "an unnamed row"
            raise InputError(path, f"{bad.height} row(s) have an empty '{col}' (first: {first})")
    dup = df.group_by("id").len().filter(pl.col("len") > 1)
    if dup.height:
        raise InputError(path, f"column 'id' is not unique ({dup.height} duplicated, e.g. '{dup['id'][0]}')")
    return df


def problems_hash(df: pl.DataFrame) -> str:
    """sha256 over (id, problem, answer) in order: identifies the problem set independently of file format."""
    h = hashlib.sha256()
    for i, p, a in df.select(PROBLEM_COLUMNS).iter_rows():
        for s in (i, p, a):
            b = s.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
    return h.hexdigest()
