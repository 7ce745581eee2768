"""Skill banks: the JSON format of ../shared/data/skill_banks/*.json and its Parquet twin.  docs/DESIGN.md 1.1.

A bank has ``general_skills`` ({skill_id, title, principle, when_to_apply}), ``common_mistakes``
({mistake_id, description, why_it_happens, how_to_avoid}), ``task_specific_skills`` and ``metadata``.
Items may carry extra keys (``origin``, ``added_in``); they survive every round trip.  :attr:`SkillBank.version`
is a content hash of the items.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from stages.engine.atomic import atomic_write_bytes, atomic_write_text, write_parquet
from stages.engine.errors import InputError
import re


SKILL_FIELDS = ("skill_id", "title", "principle", "when_to_apply")
MISTAKE_FIELDS = ("mistake_id", "description", "why_it_happens", "how_to_avoid")
KINDS = {"skill": ("general_skills", SKILL_FIELDS), "mistake": ("common_mistakes", MISTAKE_FIELDS)}
TEXT_COLUMNS = SKILL_FIELDS[1:] + MISTAKE_FIELDS[1:]
BANK_FORMAT = "sgsd-skill-bank/1"
_PARQUET_META_KEY = b"sgsd_bank"


def skill_text(s: dict) -> str:
    return f"{s['title']}. {s['principle']}. {s['when_to_apply']}"


def mistake_text(m: dict) -> str:
    return f"{m['description']}. {m['why_it_happens']}. {m['how_to_avoid']}"


def item_text(kind: str, item: dict) -> str:
    return skill_text(item) if kind == "skill" else mistake_text(item)


def item_label(kind: str, item: dict) -> str:
    """Short human label: a skill's title, a mistake's description."""
    return item["title"] if kind == "skill" else item["description"]


@dataclass
class SkillBank:
    skills: list[dict]
    mistakes: list[dict]
    task_specific: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    path: str | None = None
    extra: dict = field(default_factory=dict)  # unknown top-level keys, kept for the round trip

    @property
    def version(self) -> str:
        """Content hash of the items: the bank version an index and a checkpoint record."""
        payload = json.dumps({"s": self.skills, "m": self.mistakes}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def items(self, kind: str) -> list[dict]:
        return self.skills if kind == "skill" else self.mistakes

    def to_json(self) -> dict:
        return {
            "general_skills": self.skills,
            "task_specific_skills": self.task_specific,
            "common_mistakes": self.mistakes,
            "metadata": self.metadata,
            **self.extra,
        }


def load_bank(path: str | os.PathLike) -> SkillBank:
    """Load and validate a bank (.json, .parquet, or a ``bank/`` version folder: its latest version).

    Every problem is an InputError naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(path, "skill bank not found")
    if path.is_dir():
        versions = versions_in(path) or versions_in(path / "bank")
        if not versions:
            raise InputError(path, "folder holds no bank versions (vNNNN.json)")
        path = versions[-1].path
    if path.suffix == ".parquet":
        return _load_bank_parquet(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(path, f"skill bank is not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise InputError(path, "skill bank is not UTF-8 text") from None
    return bank_from_json(data, path)


def bank_from_json(data: Any, path: str | os.PathLike | None = None) -> SkillBank:
    if not isinstance(data, dict):
        raise InputError(path, "skill bank must be a JSON object")
    for key in ("general_skills", "common_mistakes"):
        if key not in data:
            raise InputError(path, f"skill bank has no '{key}'")
        if not isinstance(data[key], list):
            raise InputError(path, f"'{key}' must be a list")
    for key, fields in (("general_skills", SKILL_FIELDS), ("common_mistakes", MISTAKE_FIELDS)):
        seen = set()
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict):
                raise InputError(path, f"{key}[{i}] is not an object")
            for f in fields:
                if not isinstance(item.get(f), str):
                    raise InputError(path, f"{key}[{i}] has no string field '{f}'")
            if item[fields[0]] in seen:
                raise InputError(path, f"{key}[{i}] repeats id '{item[fields[0]]}'")
            seen.add(item[fields[0]])
    tss = data.get("task_specific_skills")
    meta = data.get("metadata")
    if tss is not None and not isinstance(tss, dict):
        raise InputError(path, "'task_specific_skills' must be an object")
    if meta is not None and not isinstance(meta, dict):
        raise InputError(path, "'metadata' must be an object")
    known = {"general_skills", "common_mistakes", "task_specific_skills", "metadata"}
    return SkillBank(
        skills=list(data["general_skills"]),
        mistakes=list(data["common_mistakes"]),
        task_specific=tss or {},
        metadata=meta or {},
        path=str(path) if path else None,
        extra={k: v for k, v in data.items() if k not in known},
    )


# --------------------------------------------------------------------------------------------------
# Parquet form: one row per item


def bank_to_table(bank: SkillBank):
    """A pyarrow table with one row per item (kind, position, item_id, the six text fields, extra JSON)."""
    import pyarrow as pa

    rows = []
    for kind, (_, fields) in KINDS.items():
        for i, it in enumerate(bank.items(kind)):
            row: dict[str, Any] = {c: None for c in TEXT_COLUMNS}
            row.update(kind=kind, position=i, item_id=it[fields[0]])
            for f in fields[1:]:
                row[f] = it[f]
            row["extra"] = json.dumps({k: v for k, v in it.items() if k not in fields}, ensure_ascii=False)
            rows.append(row)
    schema = pa.schema(
        [("kind", pa.string()), ("position", pa.int64()), ("item_id", pa.string())]
        + [(c, pa.string()) for c in TEXT_COLUMNS]
        + [("extra", pa.string())]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    meta = {"format": BANK_FORMAT, "version": bank.version, "task_specific_skills": bank.task_specific,
            "metadata": bank.metadata, "extra": bank.extra}
    return table.replace_schema_metadata({_PARQUET_META_KEY: json.dumps(meta, ensure_ascii=False)})


def _load_bank_parquet(path: Path) -> SkillBank:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # corrupt / not Parquet
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(path, f"skill bank is not a readable Parquet file ({msg[:160]})") from None
    need = ("kind", "position", "item_id", *TEXT_COLUMNS)
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise InputError(path, f"skill bank table has no column '{missing[0]}'")
    meta_raw = (table.schema.metadata or {}).get(_PARQUET_META_KEY)
    try:
        meta = json.loads(meta_raw) if meta_raw else {}
    except json.JSONDecodeError:
        raise InputError(path, "skill bank table has unreadable bank metadata") from None
    out: dict[str, list] = {"general_skills": [], "common_mistakes": []}
    rows = sorted(table.to_pylist(), key=lambda r: (r["kind"] or "", r["position"] if r["position"] is not None else -1))
    for r in rows:
        if r["kind"] not in KINDS:
            raise InputError(path, f"row with unknown kind '{r['kind']}' (use skill or mistake)")
        key, fields = KINDS[r["kind"]]
        item = {fields[0]: r["item_id"], **{f: r[f] for f in fields[1:]}}
        if r.get("extra"):
            try:
                extra = json.loads(r["extra"])
            except json.JSONDecodeError:
                raise InputError(path, f"item '{r['item_id']}' has an unreadable 'extra' value") from None
            if not isinstance(extra, dict):
                raise InputError(path, f"item '{r['item_id']}' has an 'extra' value that is not an object")
            item.update(extra)
        out[key].append(item)
    data = {"general_skills": out["general_skills"], "task_specific_skills": meta.get("task_specific_skills") or {},
            "common_mistakes": out["common_mistakes"], "metadata": meta.get("metadata") or {},
            **(meta.get("extra") or {})}
    return bank_from_json(data, path)


def bank_json_text(bank: SkillBank) -> str:
    return json.dumps(bank.to_json(), indent=2, ensure_ascii=False) + "\n"


def write_bank(bank: SkillBank, path: str | os.PathLike) -> Path:
    """Write a bank atomically as JSON (``.json``) or Parquet (``.parquet``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        return write_parquet(bank_to_table(bank), path)
    return atomic_write_text(path, bank_json_text(bank))


def write_new_file(path: Path, data: bytes) -> None:
    """Atomic write that refuses to replace an existing file."""
    try:
        atomic_write_bytes(path, data, exclusive=True)
    except FileExistsError:
        raise InputError(path, "bank version already exists; bank versions are never overwritten") from None


# versions folder layout (written by stages.engine.skills.versions)

VERSION_RX = re.compile(r"^v(\d{4,})$")


@dataclass(frozen=True)
class BankVersion:
    """One snapshot of a run's bank history: ``<run_dir>/bank/vNNNN.json`` (+ ``.parquet``)."""

    label: str
    number: int
    path: Path

    @property
    def parquet(self) -> Path:
        return self.path.with_suffix(".parquet")

    def load(self) -> SkillBank:
        return load_bank(self.path)


def versions_in(folder: Path) -> list[BankVersion]:
    if not folder.is_dir():
        return []
    out = []
    for p in folder.glob("v*.json"):
        m = VERSION_RX.match(p.stem)
        if m:
            out.append(BankVersion(p.stem, int(m.group(1)), p))
    return sorted(out, key=lambda v: v.number)


def require_pairs(bank: SkillBank, path) -> None:
    """A bank that cannot form one teacher (K = min(#skills, #mistakes) = 0) is refused, naming the file."""
    if not bank.skills or not bank.mistakes:
        raise InputError(path, f"skill bank has {len(bank.skills)} general skills and {len(bank.mistakes)} common "
                               "mistakes: it needs at least one of each to form a teacher (K = min of the two)")
