"""Bank versions under a run directory: ``bank/v0000.json`` (+ ``.parquet``), ``bank/v0001.json`` ...
written atomically and never overwritten.  docs/DESIGN.md 1.1.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path


from stages.engine.errors import InputError
from stages.engine.skills.bank import BankVersion, SkillBank, VERSION_RX, versions_in, write_new_file, bank_json_text, bank_to_table, load_bank


def bank_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "bank"


def version_label(n: int) -> str:
    return f"v{n:04d}"


def bank_versions(run_dir: str | os.PathLike) -> list[BankVersion]:
    """Every bank version of a run, oldest first."""
    return versions_in(bank_dir(run_dir))


def latest_bank_version(run_dir: str | os.PathLike) -> BankVersion | None:
    """The newest bank version of a run (``None`` when the run has no bank history yet)."""
    v = bank_versions(run_dir)
    return v[-1] if v else None


def save_bank_version(run_dir: str | os.PathLike, bank: SkillBank, *, info: dict | None = None,
                      label: str | None = None) -> BankVersion:
    """Write ``bank/v<next>.parquet`` and ``bank/v<next>.json``; never overwrites an existing version.

    The JSON file is written last: a version exists once its JSON does.  ``info`` is recorded in the
    bank metadata under ``update`` (the item content, hence :attr:`SkillBank.version`, is unchanged).
    ``label`` (optional) must be the next label; a version written meanwhile by someone else is refused.
    """
    prev = latest_bank_version(run_dir)
    n = prev.number + 1 if prev else 0
    if label is not None and label != version_label(n):
        raise InputError(bank_dir(run_dir) / f"{label}.json",
                         f"cannot write {label}: the run's next bank version is {version_label(n)}")
    label = version_label(n)
    meta = dict(bank.metadata)
    meta["bank_version"] = label
    meta["parent_version"] = prev.label if prev else None
    if info is not None:
        meta["update"] = info
    snap = replace(bank, metadata=meta)
    folder = bank_dir(run_dir)
    jpath, ppath = folder / f"{label}.json", folder / f"{label}.parquet"
    for p in (jpath, ppath):
        if p.exists():
            raise InputError(p, "bank version already exists; bank versions are never overwritten")
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(bank_to_table(snap), buf, compression="zstd")
    write_new_file(ppath, buf.getvalue())
    write_new_file(jpath, bank_json_text(snap).encode("utf-8"))
    return BankVersion(label, n, jpath)


def init_bank_versions(run_dir: str | os.PathLike, bank: SkillBank) -> BankVersion:
    """Start a run's bank history with ``bank`` as v0000, or check that the history starts from it."""
    versions = bank_versions(run_dir)
    if not versions:
        return save_bank_version(run_dir, bank, info={"kind": "initial", "source": bank.path})
    first = versions[0].load()
    if first.version != bank.version:
        raise InputError(versions[0].path, f"this run's bank history starts from bank version {first.version}, "
                                           f"not {bank.version} ({bank.path}); use another --run-dir")
    return versions[-1]


def bank_version_of(path: str | os.PathLike) -> str:
    """The version a checkpoint records: ``vNNNN:<content hash>`` inside a bank folder, else the hash."""
    path = Path(path)
    bank = load_bank(path)
    src = Path(bank.path) if bank.path else path
    m = VERSION_RX.match(src.stem)
    return f"{src.stem}:{bank.version}" if m else bank.version
