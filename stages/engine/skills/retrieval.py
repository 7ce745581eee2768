"""Retrieval and the teacher pool.  docs/DESIGN.md 1.2.

Retrieval ranks skills and mistakes separately against the problem text (dataset wrappers stripped),
takes the top-k of each, pairs them by rank (teacher j = (skill_j, mistake_j), K = min of the two counts)
and weights teachers by :func:`stages.engine.objectives.sgsd.teacher_weights`.  Similarities:
cosine of normalised sentence embeddings (``embedding``), rapidfuzz token-set ratio in [0, 1]
(``lexical``), their mean (``hybrid``), or seeded random scores (``random``, for ablations).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from stages.engine.errors import InputError
from stages.engine.prompts import strip_wrappers
from stages.engine.skills.encoders import DEFAULT_ENCODER, Encoder, load_encoder
from stages.engine.skills.index import read_index
from stages.engine.skills.bank import KINDS, SkillBank, item_label, mistake_text, skill_text
from stages.engine.objectives.sgsd import teacher_weights

RETRIEVAL_MODES = ("embedding", "lexical", "hybrid", "random")
SCORES_PER_BATCH = 2_000_000  # (query, item) similarities computed per batch of retrieve_many


@dataclass(frozen=True)
class Teacher:
    """One skill-conditioned teacher of the pool: (skill_j, mistake_j) with its weight."""

    rank: int
    skill: dict
    mistake: dict
    skill_score: float
    mistake_score: float
    weight: float


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
        return [(sk[i], mk[i]) for i in range(len(q))]

    def similarities(self, query: str) -> Sims:
        return self.similarities_many([query])[0]


class EmbeddingRetriever:
    """Cosine similarity of normalised sentence embeddings; queries are batch-encoded."""

    mode = "embedding"

    def __init__(self, bank: SkillBank, encoder: str | Encoder = DEFAULT_ENCODER, *,
                 skill_embeddings: np.ndarray | None = None, mistake_embeddings: np.ndarray | None = None,
                 device: str = "cpu", batch_size: int = 32, encoder_backend: str = "auto", query_prompt: bool = False):
        self.bank = bank
        self.query_prompt = query_prompt  # False: the raw problem is encoded, as the reference does (skill_memory.py:179-184)
        self.encoder = load_encoder(encoder, device, encoder_backend) if isinstance(encoder, str) else encoder
        self.batch_size = batch_size
        if skill_embeddings is None:
            skill_embeddings = self.encoder.encode([skill_text(s) for s in bank.skills], batch_size=batch_size)
        if mistake_embeddings is None:
            mistake_embeddings = self.encoder.encode([mistake_text(m) for m in bank.mistakes], batch_size=batch_size)
        self.skill_emb = np.asarray(skill_embeddings, dtype=np.float32)
        self.mistake_emb = np.asarray(mistake_embeddings, dtype=np.float32)

    def similarities_many(self, queries: Sequence[str]) -> list[Sims]:
        q = self.encoder.encode(list(queries), query=self.query_prompt, batch_size=self.batch_size)
        dim = q.shape[1] if q.ndim == 2 else 0
        for name, e in (("skill", self.skill_emb), ("mistake", self.mistake_emb)):
            if e.shape[0] and e.shape[1] != dim:
                raise InputError(None, f"{name} embeddings have dimension {e.shape[1]} but the encoder gives {dim}")
        sk = q @ self.skill_emb.T if self.skill_emb.shape[0] else np.zeros((len(queries), 0), np.float32)
        mk = q @ self.mistake_emb.T if self.mistake_emb.shape[0] else np.zeros((len(queries), 0), np.float32)
        sk, mk = sk.astype(np.float64), mk.astype(np.float64)
        return [(sk[i], mk[i]) for i in range(len(queries))]

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
            out.append((a * np.asarray(es) + (1 - a) * np.asarray(ls), a * np.asarray(em) + (1 - a) * np.asarray(lm)))
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
        return rng.random(len(self.bank.skills)), rng.random(len(self.bank.mistakes))

    def similarities_many(self, queries: Sequence[str]) -> list[Sims]:
        return [self.similarities(q) for q in queries]


def make_retriever(bank: SkillBank, mode: str = "lexical", index_path: str | os.PathLike | None = None,
                   encoder: str | None = None, seed: int = 0, device: str = "cpu", query_prompt: bool = False):
    """The retriever ``score-teachers`` uses.  With ``index_path`` (written by ``build-index``) the item
    embeddings come from the index, which must have been built from this bank's version.  ``query_prompt``:
    encode queries with the encoder's "query" prompt (default off: the raw problem, as the reference)."""
    if mode not in RETRIEVAL_MODES:
        raise InputError(None, f"unknown retrieval mode '{mode}' (use {', '.join(RETRIEVAL_MODES)})")
    index = None
    if index_path is not None:
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
                                 encoder_backend=index.encoder_backend, query_prompt=query_prompt)
    else:
        emb = EmbeddingRetriever(bank, encoder or DEFAULT_ENCODER, device=device, query_prompt=query_prompt)
    if mode == "embedding":
        return emb
    return HybridRetriever(bank, emb, LexicalRetriever(bank))


def _same_encoder(a: str, b: str) -> bool:
    if a == b:
        return True
    pa_, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa_.exists() and pb.exists() and pa_.resolve() == pb.resolve()


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the k best scores, ties broken by position (deterministic; NaN ranks last).  A partial
    selection (``np.partition``) then a sort of the few candidates: linear in the bank size, not n log n."""
    s = np.asarray(scores, dtype=np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    n = s.shape[0]
    k = min(int(k), n)
    if k <= 0:
        return []
    neg = -s
    cand = np.arange(n) if k == n else np.flatnonzero(neg <= np.partition(neg, k - 1)[k - 1])  # ties at the cut too
    order = np.lexsort((cand, neg[cand]))  # best score first, then position
    return cand[order][:k].tolist()


def teacher_pool(bank: SkillBank, sk: Sequence[float], mk: Sequence[float], k: int = 8,
                 temperature: float = 1.0) -> list[Teacher]:
    """Top-k skills and top-k mistakes paired by rank, weights = softmax of the pair's mean similarity."""
    si, mi = top_k(sk, k), top_k(mk, k)
    K = min(len(si), len(mi))
    pair = [(float(sk[si[j]]) + float(mk[mi[j]])) / 2 for j in range(K)]
    w = teacher_weights(pair, temperature)
    return [Teacher(j, bank.skills[si[j]], bank.mistakes[mi[j]], float(sk[si[j]]), float(mk[mi[j]]), w[j])
            for j in range(K)]


def retrieve(retriever, problem: str, k: int = 8, temperature: float = 1.0) -> list[Teacher]:
    sk, mk = retriever.similarities(strip_wrappers(problem))
    return teacher_pool(retriever.bank, sk, mk, k, temperature)


def retrieve_many(retriever, problems: Sequence[str], k: int = 8, temperature: float = 1.0,
                  batch_size: int = 256, on_done: Callable[[int], None] | None = None) -> list[list[Teacher]]:
    """Teacher pools for a whole table of problems: distinct queries are scored in batches (smaller ones for a
    large bank, so ``on_done(n)`` reports progress and a batch's score matrix stays small)."""
    queries = [strip_wrappers(p) for p in problems]
    distinct = list(dict.fromkeys(queries))
    items = len(retriever.bank.skills) + len(retriever.bank.mistakes)
    batch_size = max(1, min(batch_size, SCORES_PER_BATCH // max(1, items)))
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
