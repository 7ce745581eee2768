"""Compatibility names: what ``stages.engine.io`` held before it was split by concern (issue 22).

New code imports from the module of its concern:

* :mod:`stages.engine.errors`   InputError / WriteError (the one-line error contract), ``visible`` (terminal-safe text)
* :mod:`stages.engine.atomic`   atomic writes (temp file, fsync, rename), ``commit_dir``, ``file_hash``, ``to_jsonable``
* :mod:`stages.engine.tableio`  ``read_table`` and its column / finiteness checks, part directories, shards
* :mod:`stages.engine.locks`    the run-directory lock, stale temp files
* :mod:`stages.engine.manifest` ``StageRun`` (skip / refuse / redo), ``read_manifest``, ``versions``
* :mod:`stages.engine.paths`    ``REPO_ROOT``, ``DATA_DIR``, ``SGSD_VERSION``
"""

from __future__ import annotations

from stages.engine.atomic import (atomic_write_bytes, atomic_write_json, atomic_write_text, commit_dir,
                                  current_umask, file_hash, fsync_dir, to_jsonable, write_parquet)
from stages.engine.errors import InputError, WriteError, as_write_error, visible, write_failed
from stages.engine.locks import (LOCK_NAME, check_run_dir, clean_stale_temp, lock_run_dir, run_dir_in_use,
                                 run_dir_lock)
from stages.engine.manifest import StageRun, read_manifest, versions
from stages.engine.paths import DATA_DIR, REPO_ROOT, SGSD_VERSION
from stages.engine.tableio import (check_columns, check_finite, read_table, shard_bounds,
                                   shard_output_name, shard_rows, stage_table_path)

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "commit_dir", "current_umask", "file_hash",
           "fsync_dir", "to_jsonable", "write_parquet", "InputError", "WriteError", "as_write_error", "visible",
           "write_failed", "LOCK_NAME", "check_run_dir", "clean_stale_temp", "lock_run_dir", "run_dir_in_use",
           "run_dir_lock", "StageRun", "read_manifest", "versions", "DATA_DIR", "REPO_ROOT", "SGSD_VERSION",
           "check_columns", "check_finite", "read_table", "shard_bounds", "shard_output_name", "shard_rows",
           "stage_table_path"]
