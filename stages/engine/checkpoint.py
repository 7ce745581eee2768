"""Training checkpoints: atomic folders with a checksum file, validated before any resume.

A checkpoint is a folder::

    config.json, model.safetensors, tokenizer files ...   the model itself (HF folder) -- or
    adapter_config.json, adapter_model.safetensors, sgsd_base.json  (a LoRA adapter):
                           the checkpoint folder is a model folder, `--model CKPT` loads it everywhere
    merged/                optional: the LoRA adapter merged into the base weights
    optimizer.pt           full (unsharded) optimizer state, keyed by parameter name
    scheduler.pt           LR scheduler state
    ema.pt                 optional: EMA teacher weights (trainable parameters)
    rng/rank_00000.pt      torch / numpy / python RNG states, one file per rank
    metrics.parquet        the metrics rows of the optimizer steps done so far in this run directory
    trainer_state.json     policy step, local step, data-sampler position, run directory, world size, config
    sgsd_checkpoint.json   policy step, objective, skill-bank version, base model, teacher source
    checksums.json         sha256 of every other file, written last

It is written into ``.<name>.partial/`` and renamed into place, so a crash leaves either the previous
checkpoint or the new one.  :func:`validate` recomputes every checksum: a missing, truncated or modified
file makes the checkpoint invalid.  ``--resume`` refuses an invalid latest checkpoint with a clear error;
``--resume latest-valid`` falls back to the newest valid one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from stages.engine.manifest import ProgressFn
from stages.engine.atomic import atomic_write_json, commit_dir, file_hash
from stages.engine.errors import InputError, as_write_error

CHECKSUMS = "checksums.json"
STATE = "trainer_state.json"
META = "sgsd_checkpoint.json"
METRICS = "metrics.parquet"  # the metrics rows of the run so far
FORMAT = "sgsd-checkpoint/1"
FINAL = "checkpoint"          # <run_dir>/checkpoint: the state after the last optimizer step of the run
INTERMEDIATE = "checkpoints"  # <run_dir>/checkpoints/step_000123: --save-every snapshots
_STEP_RE = re.compile(r"^step_(\d+)$")

RESUME_MODES = ("auto", "latest-valid", "never")


class CheckpointError(InputError):
    """A checkpoint that must not be used (missing or mismatching files)."""


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def staged_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.partial"


def write(path: str | os.PathLike, fill: Callable[[Path], None], *, rank: int = 0, barrier: Callable[[], None] | None = None,
          commit: bool = True, progress: ProgressFn | None = None) -> Path:
    """Write a checkpoint folder atomically.

    ``fill(tmp_dir)`` is called on every rank (each writes its own files, rank 0 the shared ones); rank 0
    then writes ``checksums.json`` and renames the folder into place.  ``barrier`` synchronises ranks
    (None in one process).  The previous folder of the same name is replaced only once the new one is
    complete.  ``commit=False`` stops before the swap and returns the complete staged folder
    (``.<name>.partial``): :func:`commit` puts it in place later (train swaps its final checkpoint only once
    its metrics table is written too).  A failing write (full disk ...) removes the staged folder, leaves the
    previous checkpoint as it was and raises a one-line error naming the file.  ``progress(description,
    total)`` (rank 0) counts the fill, then each file hashed and synced: a checkpoint of a large model shows
    progress while it is written.
    """
    path = Path(path)
    tmp = staged_path(path)
    sync = barrier or (lambda: None)
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        sync()
        fill(tmp)
        sync()
        if rank == 0:
            files = _files(tmp)
            advance = progress(f"checkpoint {path.name}", 1 + len(files)) if progress else (lambda n: None)
            advance(1)
            sums = {}
            for p in files:
                sums[str(p.relative_to(tmp))] = file_hash(p)
                with open(p, "rb") as fh:
                    os.fsync(fh.fileno())
                advance(1)
            atomic_write_json(tmp / CHECKSUMS, {"format": FORMAT, "files": sums})
    except BaseException as e:  # a full disk shows up as OSError, SafetensorError or torch's RuntimeError
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        err = as_write_error(e, tmp) if isinstance(e, Exception) else None
        if err is not None and err is not e:
            raise err from None
        raise
    if not commit:
        sync()
        return tmp
    if rank == 0:
        commit_dir(tmp, path)
    sync()
    return path


def validate(path: str | os.PathLike) -> dict:
    """Check every file against ``checksums.json``; return the trainer state.  Raises CheckpointError."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "checkpoint folder not found")
    sums_path = path / CHECKSUMS
    if not sums_path.exists():
        raise CheckpointError(path, f"checkpoint is incomplete: {CHECKSUMS} is missing")
    try:
        sums = json.loads(sums_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(sums_path, "checkpoint checksum file is corrupt") from None
    for rel, want in sums.items():
        f = path / rel
        if not f.is_file():
            raise CheckpointError(path, f"checkpoint is corrupt: '{rel}' is missing")
        if file_hash(f) != want:
            raise CheckpointError(path, f"checkpoint is corrupt: '{rel}' does not match its checksum "
                                        f"(truncated or modified)")
    for required in (STATE, META):
        if required not in sums:
            raise CheckpointError(path, f"checkpoint is corrupt: '{required}' is not listed in {CHECKSUMS}")
    extra = [str(p.relative_to(path)) for p in _files(path) if str(p.relative_to(path)) not in sums]
    if extra:
        raise CheckpointError(path, f"checkpoint holds files not in its checksum list: {', '.join(extra[:3])}")
    return json.loads((path / STATE).read_text())


def load_state(path: str | os.PathLike, map_location=None):
    """A ``.pt`` file of a checkpoint (optimizer, scheduler, EMA, rng state) with ``torch.load(weights_only=True)``:
    tensors and plain values only, so a crafted file cannot run code (its checksum proves nothing: it sits in the
    same folder).  NumPy's array reconstruction is allowed too, for rng files written before the rng state was
    stored as tensors.  Anything else is refused with a CheckpointError."""
    import pickle

    import numpy as np
    import torch

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _reconstruct,
               (_reconstruct, "numpy.core.multiarray._reconstruct"), (_reconstruct, "numpy._core.multiarray._reconstruct")]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(boiler)),
                   "not a weights-only file")
        raise CheckpointError(path, f"holds objects other than tensors and plain values, refused (loading it could "
                                    f"run code): {why[:200]}") from None


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / META).exists()


def candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints of a run directory, newest first: the final one, then the snapshots by step."""
    run_dir = Path(run_dir)
    found: list[tuple[int, int, Path]] = []
    final = run_dir / FINAL
    if final.is_dir():
        found.append((1 << 62, 1, final))
    inter = run_dir / INTERMEDIATE
    if inter.is_dir():
        for p in inter.iterdir():
            m = _STEP_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), 0, p))
    return [p for _, _, p in sorted(found, reverse=True)]


def find_resume(run_dir: str | os.PathLike, mode: str = "auto", warn: Callable[[str], None] | None = None) -> Path | None:
    """The checkpoint to resume from inside ``run_dir``.

    ``auto``: the newest checkpoint, which must be valid (else CheckpointError); ``latest-valid``: the
    newest valid one, skipping (and reporting) invalid ones; ``never``: None; a path: that checkpoint.
    """
    if mode == "never":
        return None
    if mode not in RESUME_MODES:
        validate(mode)
        return Path(mode)
    for p in candidates(run_dir):
        try:
            validate(p)
            return p
        except CheckpointError as e:
            if mode == "auto":
                raise CheckpointError(p, f"{e.problem}; refusing to resume from it (pass --resume latest-valid "
                                         "to fall back to the previous valid checkpoint)") from None
            if warn:
                warn(f"skipping invalid checkpoint {p}: {e.problem}")
    return None


def step_dir(run_dir: str | os.PathLike, policy_step: int) -> Path:
    return Path(run_dir) / INTERMEDIATE / f"step_{policy_step:06d}"


def prune(run_dir: str | os.PathLike, keep_last: int, among: list[Path] | None = None) -> list[Path]:
    """Delete all but the newest ``keep_last`` snapshots under ``checkpoints/`` (0 keeps all).

    ``among``: only these snapshots count and may go (train --force: the previous run's stay until the new
    run is complete)."""
    if keep_last <= 0:
        return []
    snaps = [p for p in candidates(run_dir) if p.parent.name == INTERMEDIATE]
    if among is not None:
        allowed = {Path(p).resolve() for p in among}
        snaps = [p for p in snaps if p.resolve() in allowed]
    gone = snaps[keep_last:]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
