"""Skill banks (the JSON format of ../shared/data/skill_banks/*.json) and teacher-pool retrieval.  DESIGN 1.1-1.2.

A bank has ``general_skills`` ({skill_id, title, principle, when_to_apply}), ``common_mistakes``
({mistake_id, description, why_it_happens, how_to_avoid}), ``task_specific_skills`` and ``metadata``.
Retrieval ranks skills and mistakes separately against the problem text, takes the top-k of each,
pairs them by rank (teacher j = (skill_j, mistake_j), K = min of the two counts) and weights teachers by
``softmax_j(mean of the pair's two similarities / temperature)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from stages.io import InputError
from stages.prompts import strip_wrappers

SKILL_FIELDS = ("skill_id", "title", "principle", "when_to_apply")
MISTAKE_FIELDS = ("mistake_id", "description", "why_it_happens", "how_to_avoid")


def skill_text(s: dict) -> str:
    return f"{s['title']}. {s['principle']}. {s['when_to_apply']}"


def mistake_text(m: dict) -> str:
    return f"{m['description']}. {m['why_it_happens']}. {m['how_to_avoid']}"


@dataclass
class SkillBank:
    skills: list[dict]
    mistakes: list[dict]
    task_specific: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    path: str | None = None

    @property
    def version(self) -> str:
        """Content hash of the items: the bank version an index and a checkpoint record."""
        payload = json.dumps({"s": self.skills, "m": self.mistakes}, sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def to_json(self) -> dict:
        return {
            "general_skills": self.skills,
            "task_specific_skills": self.task_specific,
            "common_mistakes": self.mistakes,
            "metadata": self.metadata,
        }


def load_bank(path: str | os.PathLike) -> SkillBank:
    """Load and validate a bank JSON file; every problem is an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "skill bank not found")
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
    return SkillBank(
        skills=list(data["general_skills"]),
        mistakes=list(data["common_mistakes"]),
        task_specific=data.get("task_specific_skills") or {},
        metadata=data.get("metadata") or {},
        path=str(path) if path else None,
    )


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


class LexicalRetriever:
    """No-model fallback: rapidfuzz token-set similarity in [0, 1] between the query and each item text."""

    mode = "lexical"

    def __init__(self, bank: SkillBank):
        self.bank = bank
        self.skill_texts = [skill_text(s) for s in bank.skills]
        self.mistake_texts = [mistake_text(m) for m in bank.mistakes]

    def similarities(self, query: str) -> tuple[list[float], list[float]]:
        from rapidfuzz import fuzz, utils

        q = utils.default_process(query)
        sk = [fuzz.token_set_ratio(q, utils.default_process(t)) / 100.0 for t in self.skill_texts]
        mk = [fuzz.token_set_ratio(q, utils.default_process(t)) / 100.0 for t in self.mistake_texts]
        return sk, mk


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k best scores, ties broken by position (deterministic)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def retrieve(retriever, problem: str, k: int = 8, temperature: float = 1.0) -> list[Teacher]:
    query = strip_wrappers(problem)
    sk, mk = retriever.similarities(query)
    si, mi = top_k(sk, k), top_k(mk, k)
    K = min(len(si), len(mi))
    pair = [(sk[si[j]] + mk[mi[j]]) / 2 for j in range(K)]
    w = teacher_weights(pair, temperature)
    bank = retriever.bank
    return [Teacher(j, bank.skills[si[j]], bank.mistakes[mi[j]], sk[si[j]], mk[mi[j]], w[j]) for j in range(K)]
