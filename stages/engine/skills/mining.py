"""Mining machinery shared by ``sgsd mine-skills`` and the online update: memories from graded attempts,
candidate extraction by a writer, hierarchical merge and dedupe.  docs/DESIGN.md 1.1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

import polars as pl

from stages.engine.config import Checked, opt
from stages.engine.grading import grades_for
from stages.engine.errors import InputError
from stages.engine.prompts import fill, load_template, strip_wrappers
from stages.engine.skills.bank import KINDS, SkillBank, item_text
from stages.engine.skills.writer import Writer, parse_json_reply


TEMPLATES = {
    ("extract", "skill"): "extract_skill",
    ("extract", "mistake"): "extract_mistake",
    ("merge", "skill"): "merge_skills",
    ("merge", "mistake"): "merge_mistakes",
}


@dataclass
class MiningParams(Checked):
    max_items_per_attempt: int = opt(3, "Candidates kept per attempt (1-3 in the reference).", group="Mining", flag="max-items", ge=1)
    excerpt_chars: int = opt(2000, "Characters of each completion shown to the writer (head and tail).", group="Mining", ge=1)
    merge_group_size: int = opt(32, "Items per merge group.", group="Mining", flag="group-size", ge=2)
    merge_patience: int = opt(3, "Stop merging after this many consecutive layers that do not shrink.", group="Mining", flag="patience", ge=1)
    near_duplicate_threshold: float = opt(90.0, "rapidfuzz token_sort_ratio (0-100) at or above which two items are near duplicates; 0 turns it off.", group="Mining", flag="near-duplicate", ge=0, le=100)
    verify_timeout_s: float = opt(5.0, "Seconds per verifier call when the attempts are not graded yet.", group="Mining", flag="verify-timeout", gt=0)

    def check(self) -> None:
        if self.merge_group_size < 2:
            raise InputError(None, "--group-size must be at least 2")
        if self.merge_patience < 1:
            raise InputError(None, "--patience must be at least 1")
        if self.max_items_per_attempt < 1:
            raise InputError(None, "--max-items must be at least 1")


def template_texts() -> dict[str, str]:
    return {name: load_template(name) for name in TEMPLATES.values()}


# --------------------------------------------------------------------------------------------------
# step 1: memories

MEMORY_SCHEMA = {
    "memory_id": pl.String,
    "rollout_id": pl.String,
    "problem_id": pl.String,
    "problem": pl.String,
    "completion_excerpt": pl.String,
    "pred": pl.String,
    "gold": pl.String,
    "outcome": pl.String,  # success | failure
    "correct": pl.Boolean,
    "status": pl.String,
    "finish_reason": pl.String,
}

ROLLOUT_REQUIRED = {"problem": str, "completion": str, "answer": str}


def excerpt(text: str, max_chars: int) -> str:
    """Whitespace-compacted text; when longer than ``max_chars``, its head and tail around a marker."""
    t = " ".join((text or "").split())
    if len(t) <= max_chars:
        return t
    marker = " ...[snip]... "
    head = max(0, (max_chars - len(marker)) // 2)
    tail = max(0, max_chars - len(marker) - head)
    return t[:head].rstrip() + marker + (t[-tail:].lstrip() if tail else "")


def build_memories(rollouts: pl.DataFrame, params: MiningParams, grades: pl.DataFrame | None = None,
                   on_done: Callable[[int], None] | None = None) -> pl.DataFrame:
    """One memory per graded attempt (``grades`` from :func:`stages.engine.grading.grades_for`, computed when not given)."""
    if grades is None:
        grades = grades_for(rollouts, timeout_s=params.verify_timeout_s, on_done=on_done)
    n = rollouts.height
    rid = rollouts["rollout_id"].to_list() if "rollout_id" in rollouts.columns else [f"attempt-{i}" for i in range(n)]
    pid = rollouts["problem_id"].to_list() if "problem_id" in rollouts.columns else [r.split("#")[0] for r in rid]
    fin = rollouts["finish_reason"].to_list() if "finish_reason" in rollouts.columns else [None] * n
    correct = grades["correct"].to_list()
    return pl.DataFrame({
        "memory_id": [f"mem-{i:06d}" for i in range(n)],
        "rollout_id": [str(r) for r in rid],
        "problem_id": [str(p) for p in pid],
        "problem": [strip_wrappers(p or "") for p in rollouts["problem"].to_list()],
        "completion_excerpt": [excerpt(c, params.excerpt_chars) for c in rollouts["completion"].to_list()],
        "pred": grades["pred"].to_list(),
        "gold": [str(a) for a in rollouts["answer"].to_list()],
        "outcome": ["success" if c else "failure" for c in correct],
        "correct": correct,
        "status": grades["status"].to_list(),
        "finish_reason": fin,
    }, schema=MEMORY_SCHEMA)


# --------------------------------------------------------------------------------------------------
# step 2: candidates

CANDIDATE_SCHEMA = {
    "memory_id": pl.String,
    "outcome": pl.String,
    "kind": pl.String,  # skill (from a success) | mistake (from a failure)
    "item_index": pl.Int64,  # -1 on a row that carries a reply without items
    **{c: pl.String for c in ("title", "principle", "when_to_apply", "description", "why_it_happens", "how_to_avoid")},
    "parse_status": pl.String,  # ok | empty | unparsable | no_items
    "raw": pl.String,
}


def memory_json(m: dict) -> str:
    """What the writer sees of one attempt."""
    d = {"problem": m["problem"], "outcome": "correct" if m["correct"] else "incorrect",
         "predicted_answer": m["pred"], "reference_answer": m["gold"], "solution_excerpt": m["completion_excerpt"]}
    if not m["correct"]:
        if m.get("finish_reason") == "length":
            d["note"] = "the attempt was cut off at the token limit before finishing"
        elif m["pred"] is None:
            d["note"] = "no final answer was found in the attempt"
    return json.dumps(d, ensure_ascii=False, indent=2)


def extraction_prompt(m: dict) -> str:
    kind = "skill" if m["correct"] else "mistake"
    return fill(load_template(TEMPLATES[("extract", kind)]), memory_json=memory_json(m))


def extract_candidates(memories: pl.DataFrame, writer: Writer, params: MiningParams,
                       on_done: Callable[[int], None] | None = None) -> pl.DataFrame:
    """Ask the writer for 1-3 items per memory and parse its replies (defensively, never fatal)."""
    mems = memories.to_dicts()
    replies = writer.complete([extraction_prompt(m) for m in mems], on_done=on_done)
    if len(replies) != len(mems):
        raise RuntimeError(f"writer returned {len(replies)} replies for {len(mems)} prompts")
    rows: dict[str, list] = {k: [] for k in CANDIDATE_SCHEMA}
    text_cols = [c for c in CANDIDATE_SCHEMA if c not in ("memory_id", "outcome", "kind", "item_index", "parse_status", "raw")]
    for m, reply in zip(mems, replies):
        kind = "skill" if m["correct"] else "mistake"
        key, fields = KINDS[kind]
        items, status = parse_json_reply(reply, key, fields[1:])
        items = items[: params.max_items_per_attempt]
        for i, it in enumerate(items or [None]):
            rows["memory_id"].append(m["memory_id"])
            rows["outcome"].append(m["outcome"])
            rows["kind"].append(kind)
            rows["item_index"].append(i if it else -1)
            for c in text_cols:
                rows[c].append(it.get(c) if it else None)
            rows["parse_status"].append(status)
            rows["raw"].append(reply)
    return pl.DataFrame(rows, schema=CANDIDATE_SCHEMA)


def candidate_counts(cands: pl.DataFrame) -> dict:
    per_reply = cands.unique("memory_id", keep="first")
    status = {k: int(v) for k, v in per_reply["parse_status"].value_counts().iter_rows()}
    ok = cands.filter(pl.col("parse_status") == "ok")
    return {"replies": per_reply.height, "parse_status": status,
            "failed_replies": per_reply.height - status.get("ok", 0),
            "skills": int((ok["kind"] == "skill").sum()), "mistakes": int((ok["kind"] == "mistake").sum())}


def candidate_items(cands: pl.DataFrame, kind: str) -> list[dict]:
    fields = KINDS[kind][1]
    sub = cands.filter((pl.col("parse_status") == "ok") & (pl.col("kind") == kind))
    return [{f: r[f] for f in fields[1:]} for r in sub.select(list(fields[1:])).to_dicts()]


# --------------------------------------------------------------------------------------------------
# step 3: merge


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def hierarchical_merge(items: list[dict], kind: str, writer: Writer, group_size: int = 32, patience: int = 3,
                       on_layer: Callable[[dict], None] | None = None) -> tuple[list[dict], list[dict], dict]:
    """Merge groups of ``group_size`` with the writer, layer after layer, until one group is left or
    ``patience`` consecutive layers do not shrink.  A group whose reply cannot be used (unparsable,
    empty, or more items than it was given) is kept as it was and counted.

    Returns (items, per-layer stats in the shared banks' format, counters)."""
    key, fields = KINDS[kind]
    tmpl = load_template(TEMPLATES[("merge", kind)])
    current = [{f: it[f] for f in fields[1:]} for it in items]
    layers: list[dict] = []
    counters = {"merge_calls": 0, "merge_failures": 0}
    if not current:
        return [], layers, counters
    stagnant = 0
    while True:
        groups = _chunks(current, group_size)
        todo = [gi for gi, g in enumerate(groups) if len(g) > 1]
        prompts = [fill(tmpl, items_json=json.dumps(groups[gi], ensure_ascii=False, indent=2)) for gi in todo]
        replies = writer.complete(prompts) if prompts else []
        result = dict(enumerate(groups))
        for gi, reply in zip(todo, replies):
            counters["merge_calls"] += 1
            got, status = parse_json_reply(reply, key, fields[1:])
            if status != "ok" or len(got) > len(groups[gi]):
                counters["merge_failures"] += 1
                continue
            result[gi] = got
        nxt = [it for gi in range(len(groups)) for it in result[gi]]
        stagnant = 0 if len(nxt) < len(current) else stagnant + 1
        reason = None
        if len(groups) == 1:
            reason = "root_group_reached"
        elif stagnant >= patience:
            reason = "stagnation_patience_reached"
        layer = {"layer_index": len(layers), "input_items": len(current), "num_groups": len(groups),
                 "output_items": len(nxt), "stagnant_layers": stagnant, "stopped_reason": reason}
        layers.append(layer)
        if on_layer:
            on_layer(layer)
        current = nxt
        if reason:
            return current, layers, counters


def _norm(s: str) -> str:
    return " ".join(str(s).split()).lower()


def dedupe_items(items: list[dict], kind: str, threshold: float = 90.0,
                 against: Sequence[dict] = ()) -> tuple[list[dict], int, int]:
    """Drop exact duplicates (case and whitespace ignored) and near duplicates (rapidfuzz
    ``token_sort_ratio`` of the item texts >= ``threshold``), keeping the first of each cluster.  Items that
    duplicate one of ``against`` (kept items, e.g. the static part of a bank) are dropped too.

    Returns (kept items, exact duplicates removed, near duplicates removed)."""
    from rapidfuzz import fuzz, process, utils

    fields = KINDS[kind][1][1:]
    seen = {tuple(_norm(a.get(f, "")) for f in fields) for a in against}
    exact: list[dict] = []
    n_exact = 0
    for it in items:
        sig = tuple(_norm(it[f]) for f in fields)
        if sig in seen:
            n_exact += 1
            continue
        seen.add(sig)
        exact.append(it)
    if threshold <= 0 or not exact:
        return exact, n_exact, 0
    ref = [utils.default_process(item_text(kind, a)) for a in against]
    texts = [utils.default_process(item_text(kind, it)) for it in exact]
    kept_idx: list[int] = []
    n_near = 0
    sim_ref = (process.cdist(texts, ref, scorer=fuzz.token_sort_ratio, workers=1) if ref else None)
    sim = process.cdist(texts, texts, scorer=fuzz.token_sort_ratio, workers=1)
    for i in range(len(exact)):
        if (sim_ref is not None and (sim_ref[i] >= threshold).any()) or any(sim[i, j] >= threshold for j in kept_idx):
            n_near += 1
            continue
        kept_idx.append(i)
    return [exact[i] for i in kept_idx], n_exact, n_near


def assign_ids(items: list[dict], kind: str, prefix: str | None = None, start: int = 1) -> list[dict]:
    idf = KINDS[kind][1][0]
    prefix = prefix or ("gen" if kind == "skill" else "err")
    return [{idf: f"{prefix}_{start + i:03d}", **{k: v for k, v in it.items() if k != idf}} for i, it in enumerate(items)]


def merge_kind(items: list[dict], kind: str, writer: Writer, params: MiningParams,
               against: Sequence[dict] = (), on_layer: Callable[[dict], None] | None = None) -> tuple[list[dict], dict]:
    """Exact-dedupe, hierarchical merge, exact + near dedupe.  Returns (items without ids, stats)."""
    pre, pre_exact, _ = dedupe_items(items, kind, threshold=0)
    merged, layers, counters = hierarchical_merge(pre, kind, writer, params.merge_group_size, params.merge_patience,
                                                  on_layer=on_layer)
    final, n_exact, n_near = dedupe_items(merged, kind, params.near_duplicate_threshold, against=against)
    return final, {"input": len(items), "output": len(final), "layers": layers, **counters,
                   "exact_duplicates_removed": pre_exact + n_exact, "near_duplicates_removed": n_near}


def merge_candidates(cands: pl.DataFrame, writer: Writer, params: MiningParams, source: str = "",
                     on_layer: Callable[[dict], None] | None = None) -> SkillBank:
    """Step 3: the bank from a candidates table."""
    skills, s_stats = merge_kind(candidate_items(cands, "skill"), "skill", writer, params, on_layer=on_layer)
    mistakes, m_stats = merge_kind(candidate_items(cands, "mistake"), "mistake", writer, params, on_layer=on_layer)
    meta = {
        "source": source,
        "merge_group_size": params.merge_group_size,
        "merge_stagnation_patience": params.merge_patience,
        "input_general_skills": s_stats["input"],
        "output_general_skills": s_stats["output"],
        "input_common_mistakes": m_stats["input"],
        "output_common_mistakes": m_stats["output"],
        "general_merge_layers": s_stats["layers"],
        "common_mistake_merge_layers": m_stats["layers"],
        "merge_calls": s_stats["merge_calls"] + m_stats["merge_calls"],
        "merge_failures": s_stats["merge_failures"] + m_stats["merge_failures"],
        "exact_duplicates_removed": s_stats["exact_duplicates_removed"] + m_stats["exact_duplicates_removed"],
        "near_duplicates_removed": s_stats["near_duplicates_removed"] + m_stats["near_duplicates_removed"],
        "near_duplicate_threshold": params.near_duplicate_threshold,
        "candidates": candidate_counts(cands),
    }
    return SkillBank(skills=assign_ids(skills, "skill"), mistakes=assign_ids(mistakes, "mistake"),
                     task_specific={}, metadata=meta)
