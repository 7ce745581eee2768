"""Stage manifests and the skip / refuse / redo decision of a rerun (the StageRun contract).  docs/DESIGN.md 3."""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import polars as pl

from stages.engine.atomic import atomic_write_json, file_hash, fsync_dir, write_parquet
from stages.engine.config import runtime_names, stage_key
from stages.engine.errors import InputError
from stages.engine.locks import lock_run_dir
from stages.engine.paths import SGSD_VERSION

# the progress callback of a stage's ``run`` (docs/DESIGN.md 2): ``progress(description, total)`` returns ``advance(n)``
ProgressFn = Callable[[str, int], Callable[[int], None]]


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
        self.config_json = stage_key(self.config)  # runtime-only fields (opt(key=False)) left out
        self._runtime = runtime_names(self.config)
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
        # a manifest written before a field was marked runtime-only still matches
        old = {**old, "config": _without(old.get("config"), self.config_json, self._runtime)}
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
                fsync_dir(self.output.parent)
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


def _without(old: Any, new: Any, names: set[str]) -> Any:
    """``old`` without the keys in ``names`` that ``new`` (the same structure) no longer has, at any depth."""
    if isinstance(old, dict) and isinstance(new, dict):
        return {k: _without(v, new.get(k), names) for k, v in old.items() if k in new or k not in names}
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [_without(a, b, names) for a, b in zip(old, new)]
    return old


def read_manifest(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
