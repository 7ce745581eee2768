"""Skill banks (the JSON format of ../shared/data/skill_banks/*.json) and teacher-pool retrieval.  DESIGN 1.1-1.2.

A bank has ``general_skills`` ({skill_id, title, principle, when_to_apply}), ``common_mistakes``
({mistake_id, description, why_it_happens, how_to_avoid}), ``task_specific_skills`` and ``metadata``.
Items may carry extra keys (``origin``, ``added_in`` for items added by online updates); they survive
every round trip.  A bank is stored as JSON (the shared format) or as Parquet (one row per item, the bank
metadata in the Parquet schema metadata); :func:`load_bank` reads both.

Versions: :attr:`SkillBank.version` is a content hash of the items.  Under a run directory the bank's
history is ``bank/v0000.json`` (+ ``.parquet``), ``bank/v0001.json`` ... written atomically and never
overwritten (:func:`save_bank_version`, :func:`latest_bank_version`, :func:`bank_version_of`).

Retrieval ranks skills and mistakes separately against the problem text (dataset wrappers stripped),
takes the top-k of each, pairs them by rank (teacher j = (skill_j, mistake_j), K = min of the two counts)
and weights teachers by ``softmax_j(mean of the pair's two similarities / temperature)``.  Similarities:
cosine of normalised sentence embeddings (``embedding``), rapidfuzz token-set ratio in [0, 1]
(``lexical``), their mean (``hybrid``), or seeded random scores (``random``, for ablations).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from stages.io import InputError, atomic_write_bytes, atomic_write_text, write_parquet
from stages.prompts import strip_wrappers

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
        versions = _versions_in(path) or _versions_in(path / "bank")
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


def _write_new_file(path: Path, data: bytes) -> None:
    """Atomic write that refuses to replace an existing file."""
    try:
        atomic_write_bytes(path, data, exclusive=True)
    except FileExistsError:
        raise InputError(path, "bank version already exists; bank versions are never overwritten") from None


# --------------------------------------------------------------------------------------------------
# versions under a run directory


_VERSION_RX = re.compile(r"^v(\d{4,})$")


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


def bank_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "bank"


def version_label(n: int) -> str:
    return f"v{n:04d}"


def _versions_in(folder: Path) -> list[BankVersion]:
    if not folder.is_dir():
        return []
    out = []
    for p in folder.glob("v*.json"):
        m = _VERSION_RX.match(p.stem)
        if m:
            out.append(BankVersion(p.stem, int(m.group(1)), p))
    return sorted(out, key=lambda v: v.number)


def bank_versions(run_dir: str | os.PathLike) -> list[BankVersion]:
    """Every bank version of a run, oldest first."""
    return _versions_in(bank_dir(run_dir))


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
    _write_new_file(ppath, buf.getvalue())
    _write_new_file(jpath, bank_json_text(snap).encode("utf-8"))
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
    m = _VERSION_RX.match(src.stem)
    return f"{src.stem}:{bank.version}" if m else bank.version


# --------------------------------------------------------------------------------------------------
# diff


def _norm(v: Any) -> str:
    return " ".join(str(v if v is not None else "").split())


def _content(kind: str, item: dict) -> tuple:
    return tuple(_norm(item.get(f)) for f in KINDS[kind][1][1:])


def diff_banks(old: SkillBank, new: SkillBank) -> list[dict]:
    """Per item: status added / removed / changed (same id, other text) / renamed (same text, other id).

    Unchanged items are left out.
    """
    out = []
    for kind, (_, fields) in KINDS.items():
        idf = fields[0]
        o_items, n_items = old.items(kind), new.items(kind)
        o_by_content = {}
        for it in o_items:
            o_by_content.setdefault(_content(kind, it), it)
        matched_old: set[str] = set()
        pending = []
        for it in n_items:
            c = _content(kind, it)
            if c in o_by_content and o_by_content[c][idf] not in matched_old:
                o = o_by_content[c]
                matched_old.add(o[idf])
                if o[idf] != it[idf]:
                    out.append({"kind": kind, "status": "renamed", "old_id": o[idf], "new_id": it[idf],
                                "label": item_label(kind, it), "fields": []})
            else:
                pending.append(it)
        o_rest = {it[idf]: it for it in o_items if it[idf] not in matched_old}
        for it in pending:
            o = o_rest.pop(it[idf], None)
            if o is not None:
                changed = [f for f in fields[1:] if _norm(o.get(f)) != _norm(it.get(f))]
                out.append({"kind": kind, "status": "changed", "old_id": o[idf], "new_id": it[idf],
                            "label": item_label(kind, it), "old_label": item_label(kind, o), "fields": changed})
            else:
                out.append({"kind": kind, "status": "added", "old_id": None, "new_id": it[idf],
                            "label": item_label(kind, it), "fields": []})
        for o in o_rest.values():
            out.append({"kind": kind, "status": "removed", "old_id": o[idf], "new_id": None,
                        "label": item_label(kind, o), "fields": []})
    return out


# --------------------------------------------------------------------------------------------------
# sentence encoders

DEFAULT_ENCODER = "Qwen/Qwen3-Embedding-0.6B"
RETRIEVAL_MODES = ("embedding", "lexical", "hybrid", "random")


class Encoder:
    """Texts -> L2-normalised float32 embeddings.  ``query=True`` applies the model's query prompt."""

    name: str
    kind: str

    def encode(self, texts: Sequence[str], *, query: bool = False, batch_size: int = 32) -> np.ndarray:
        raise NotImplementedError


class SentenceTransformerEncoder(Encoder):
    kind = "sentence-transformers"

    def __init__(self, name: str, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.model = SentenceTransformer(name, device=device)
        prompts = getattr(self.model, "prompts", None) or {}
        self.query_prompt = "query" if prompts.get("query") else None

    def encode(self, texts, *, query=False, batch_size=32):
        if len(texts) == 0:
            return np.zeros((0, self.model.get_sentence_embedding_dimension() or 0), dtype=np.float32)
        kw = {"prompt_name": self.query_prompt} if query and self.query_prompt else {}
        emb = self.model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False, **kw)
        return np.asarray(emb, dtype=np.float32)


class MeanPoolEncoder(Encoder):
    """Any HF encoder through transformers AutoModel: attention-masked mean of the last hidden states."""

    kind = "hf-mean-pool"

    def __init__(self, name: str, device: str = "cpu", max_length: int = 512):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = name
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name, dtype=torch.float32).to(self.device).eval()
        self.max_length = min(max_length, getattr(self.tokenizer, "model_max_length", max_length) or max_length)

    def encode(self, texts, *, query=False, batch_size=32):
        import torch

        out = []
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                enc = self.tokenizer(list(texts[s : s + batch_size]), padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state.float()
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
        if not out:
            return np.zeros((0, int(self.model.config.hidden_size)), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)


def _has_st_config(name: str) -> bool:
    p = Path(name)
    return (p / "modules.json").exists() or (p / "config_sentence_transformers.json").exists()


def load_encoder(name: str, device: str = "cpu", backend: str = "auto") -> Encoder:
    """``backend``: auto (sentence-transformers when installed and the model has its config, else
    transformers mean pooling), ``sentence-transformers`` or ``hf``.  Loaded encoders are cached."""
    return _load_encoder(str(name), str(device), backend or "auto")


load_encoder.cache_clear = lambda: _load_encoder.cache_clear()  # type: ignore[attr-defined]


@lru_cache(maxsize=4)
def _load_encoder(name: str, device: str, backend: str) -> Encoder:
    if backend not in ("auto", "sentence-transformers", "hf"):
        raise InputError(None, f"unknown encoder backend '{backend}' (use auto, sentence-transformers or hf)")
    p = Path(name)
    if (p.exists() or name.startswith((".", "/", "~"))) and not p.is_dir():
        raise InputError(name, "encoder path is not a folder" if p.exists() else "encoder folder does not exist")
    if backend == "auto":
        try:
            import sentence_transformers  # noqa: F401

            have_st = True
        except ImportError:
            have_st = False
        backend = "sentence-transformers" if have_st and (not p.is_dir() or _has_st_config(name)) else "hf"
    try:
        if backend == "sentence-transformers":
            return SentenceTransformerEncoder(name, device)
        return MeanPoolEncoder(name, device)
    except ImportError as e:
        raise InputError(name, f"cannot load encoder ({e}; pip install 'sgsd[embed]')") from None
    except Exception as e:  # OSError, ValueError, hub errors offline ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(name, f"cannot load encoder ({msg[:200]})") from None


# --------------------------------------------------------------------------------------------------
# retrieval


@dataclass(frozen=True)
class Teacher:
    """One skill-conditioned teacher of the pool: (skill_j, mistake_j) with its weight."""

    rank: int
    skill: dict
    mistake: dict
    skill_score: float
    mistake_score: float
    weight: float


def teacher_weights(pair_scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """w_j = softmax_j(mean pair similarity / temperature).  DESIGN 1.2."""
    if not pair_scores:
        return []
    z = [s / temperature for s in pair_scores]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


Sims = tuple[list[float], list[float]]


class LexicalRetriever:
    """No-model fallback: rapidfuzz token-set similarity in [0, 1] between the query and each item text."""

    mode = "lexical"

    def __init__(self, bank: SkillBank):
        from rapidfuzz import utils

        self.bank = bank
        self.skill_texts = [skill_text(s) for s in bank.skills]
        self.mistake_texts = [mistake_text(m) for m in bank.mistakes]
        self._sk = [utils.default_process(t) for t in self.skill_texts]
        self._mk = [utils.default_process(t) for t in self.mistake_texts]

    def _scores(self, queries: list[str], choices: list[str]) -> np.ndarray:
        from rapidfuzz import fuzz, process

        if not choices or not queries:
            return np.zeros((len(queries), len(choices)), dtype=np.float64)
        return process.cdist(queries, choices, scorer=fuzz.token_set_ratio, dtype=np.float64, workers=1) / 100.0

    def similarities_many(self, queries: Sequence[str]) -> list[Sims]:
        from rapidfuzz import utils

        q = [utils.default_process(x) for x in queries]
        sk, mk = self._scores(q, self._sk), self._scores(q, self._mk)
        return [(sk[i].tolist(), mk[i].tolist()) for i in range(len(q))]

    def similarities(self, query: str) -> Sims:
        return self.similarities_many([query])[0]


class EmbeddingRetriever:
    """Cosine similarity of normalised sentence embeddings; queries are batch-encoded."""

    mode = "embedding"

    def __init__(self, bank: SkillBank, encoder: str | Encoder = DEFAULT_ENCODER, *,
                 skill_embeddings: np.ndarray | None = None, mistake_embeddings: np.ndarray | None = None,
                 device: str = "cpu", batch_size: int = 32, encoder_backend: str = "auto"):
        self.bank = bank
        self.encoder = load_encoder(encoder, device, encoder_backend) if isinstance(encoder, str) else encoder
        self.batch_size = batch_size
        if skill_embeddings is None:
            skill_embeddings = self.encoder.encode([skill_text(s) for s in bank.skills], batch_size=batch_size)
        if mistake_embeddings is None:
            mistake_embeddings = self.encoder.encode([mistake_text(m) for m in bank.mistakes], batch_size=batch_size)
        self.skill_emb = np.asarray(skill_embeddings, dtype=np.float32)
        self.mistake_emb = np.asarray(mistake_embeddings, dtype=np.float32)

    def similarities_many(self, queries: Sequence[str]) -> list[Sims]:
        q = self.encoder.encode(list(queries), query=True, batch_size=self.batch_size)
        dim = q.shape[1] if q.ndim == 2 else 0
        for name, e in (("skill", self.skill_emb), ("mistake", self.mistake_emb)):
            if e.shape[0] and e.shape[1] != dim:
                raise InputError(None, f"{name} embeddings have dimension {e.shape[1]} but the encoder gives {dim}")
        sk = q @ self.skill_emb.T if self.skill_emb.shape[0] else np.zeros((len(queries), 0), np.float32)
        mk = q @ self.mistake_emb.T if self.mistake_emb.shape[0] else np.zeros((len(queries), 0), np.float32)
        return [(sk[i].astype(np.float64).tolist(), mk[i].astype(np.float64).tolist()) for i in range(len(queries))]

    def similarities(self, query: str) -> Sims:
        return self.similarities_many([query])[0]


class HybridRetriever:
    """``alpha * cosine + (1 - alpha) * lexical`` per item."""

    mode = "hybrid"

    def __init__(self, bank: SkillBank, embedding: EmbeddingRetriever, lexical: LexicalRetriever, alpha: float = 0.5):
        self.bank, self.embedding, self.lexical, self.alpha = bank, embedding, lexical, alpha

    def similarities_many(self, queries: Sequence[str]) -> list[Sims]:
        a = self.alpha
        out = []
        for (es, em), (ls, lm) in zip(self.embedding.similarities_many(queries), self.lexical.similarities_many(queries)):
            out.append(([a * x + (1 - a) * y for x, y in zip(es, ls)], [a * x + (1 - a) * y for x, y in zip(em, lm)]))
        return out

    def similarities(self, query: str) -> Sims:
        return self.similarities_many([query])[0]


class RandomRetriever:
    """Ablation: uniform scores in [0, 1), seeded by (seed, query text) so every run draws the same pool."""

    mode = "random"

    def __init__(self, bank: SkillBank, seed: int = 0):
        self.bank, self.seed = bank, seed

    def similarities(self, query: str) -> Sims:
        h = int.from_bytes(hashlib.sha256(f"{self.seed}\x00{query}".encode()).digest()[:8], "little")
        rng = np.random.default_rng(h)
        return rng.random(len(self.bank.skills)).tolist(), rng.random(len(self.bank.mistakes)).tolist()

    def similarities_many(self, queries: Sequence[str]) -> list[Sims]:
        return [self.similarities(q) for q in queries]


def make_retriever(bank: SkillBank, mode: str = "lexical", index_path: str | os.PathLike | None = None,
                   encoder: str | None = None, seed: int = 0, device: str = "cpu"):
    """The retriever ``score-teachers`` uses.  With ``index_path`` (written by ``build-index``) the item
    embeddings come from the index, which must have been built from this bank's version."""
    if mode not in RETRIEVAL_MODES:
        raise InputError(None, f"unknown retrieval mode '{mode}' (use {', '.join(RETRIEVAL_MODES)})")
    index = None
    if index_path is not None:
        from stages.build_index import read_index

        index = read_index(index_path, bank)
    if mode == "random":
        return RandomRetriever(bank, seed)
    if mode == "lexical":
        return LexicalRetriever(bank)
    if index is not None:
        if not index.has_embeddings:
            raise InputError(index_path, f"index was built in '{index.mode}' mode and holds no embeddings; "
                                         f"rebuild it with --mode embedding or hybrid")
        if encoder and not _same_encoder(encoder, index.encoder):
            raise InputError(index_path, f"index was built with encoder '{index.encoder}', not '{encoder}'")
        emb = EmbeddingRetriever(bank, index.encoder, skill_embeddings=index.skill_embeddings,
                                 mistake_embeddings=index.mistake_embeddings, device=device,
                                 encoder_backend=index.encoder_backend)
    else:
        emb = EmbeddingRetriever(bank, encoder or DEFAULT_ENCODER, device=device)
    if mode == "embedding":
        return emb
    return HybridRetriever(bank, emb, LexicalRetriever(bank))


def _same_encoder(a: str, b: str) -> bool:
    if a == b:
        return True
    pa_, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa_.exists() and pb.exists() and pa_.resolve() == pb.resolve()


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k best scores, ties broken by position (deterministic)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def teacher_pool(bank: SkillBank, sk: Sequence[float], mk: Sequence[float], k: int = 8,
                 temperature: float = 1.0) -> list[Teacher]:
    """Top-k skills and top-k mistakes paired by rank, weights = softmax of the pair's mean similarity."""
    si, mi = top_k(sk, k), top_k(mk, k)
    K = min(len(si), len(mi))
    pair = [(sk[si[j]] + mk[mi[j]]) / 2 for j in range(K)]
    w = teacher_weights(pair, temperature)
    return [Teacher(j, bank.skills[si[j]], bank.mistakes[mi[j]], float(sk[si[j]]), float(mk[mi[j]]), w[j])
            for j in range(K)]


def retrieve(retriever, problem: str, k: int = 8, temperature: float = 1.0) -> list[Teacher]:
    sk, mk = retriever.similarities(strip_wrappers(problem))
    return teacher_pool(retriever.bank, sk, mk, k, temperature)


def retrieve_many(retriever, problems: Sequence[str], k: int = 8, temperature: float = 1.0,
                  batch_size: int = 256, on_done: Callable[[int], None] | None = None) -> list[list[Teacher]]:
    """Teacher pools for a whole table of problems: distinct queries are scored in batches."""
    queries = [strip_wrappers(p) for p in problems]
    distinct = list(dict.fromkeys(queries))
    pools: dict[str, list[Teacher]] = {}
    many = getattr(retriever, "similarities_many", None)
    for s in range(0, len(distinct), batch_size):
        chunk = distinct[s : s + batch_size]
        sims = many(chunk) if many else [retriever.similarities(q) for q in chunk]
        for q, (sk, mk) in zip(chunk, sims):
            pools[q] = teacher_pool(retriever.bank, sk, mk, k, temperature)
        if on_done:
            on_done(len(chunk))
    return [pools[q] for q in queries]


def retrieval_stats(retriever, problems: Sequence[str], k: int = 8, temperature: float = 1.0,
                    on_done: Callable[[int], None] | None = None):
    """Per bank item: how often it is retrieved over ``problems`` (count, share, top-1 count, mean rank,
    mean teacher weight).  Items never retrieved are listed with count 0."""
    import polars as pl

    pools = retrieve_many(retriever, problems, k=k, temperature=temperature, on_done=on_done)
    bank = retriever.bank
    acc: dict[tuple[str, str], dict] = {}
    for kind, (_, fields) in KINDS.items():
        for it in bank.items(kind):
            acc[(kind, it[fields[0]])] = {"kind": kind, "item_id": it[fields[0]], "label": item_label(kind, it),
                                          "origin": it.get("origin", "static"), "retrieved": 0, "top1": 0,
                                          "_ranks": [], "_weights": []}
    for pool in pools:
        for t in pool:
            for kind, item in (("skill", t.skill), ("mistake", t.mistake)):
                a = acc[(kind, item[KINDS[kind][1][0]])]
                a["retrieved"] += 1
                a["top1"] += t.rank == 0
                a["_ranks"].append(t.rank)
                a["_weights"].append(t.weight)
    n = max(1, len(problems))
    rows = []
    for a in acc.values():
        r, w = a.pop("_ranks"), a.pop("_weights")
        rows.append({**a, "share": a["retrieved"] / n, "mean_rank": float(np.mean(r)) if r else None,
                     "mean_weight": float(np.mean(w)) if w else None})
    schema = {"kind": pl.String, "item_id": pl.String, "label": pl.String, "origin": pl.String,
              "retrieved": pl.Int64, "top1": pl.Int64, "share": pl.Float64, "mean_rank": pl.Float64,
              "mean_weight": pl.Float64}
    df = pl.DataFrame(rows, schema=schema) if rows else pl.DataFrame(schema=schema)
    return df.sort(["kind", "retrieved", "item_id"], descending=[True, True, False])
