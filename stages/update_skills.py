"""`sgsd update-skills` (and the loop's ``--skill-update-every N``): online bank updates.  docs/DESIGN.md 1.1 step 4.

From *all* rollouts of a window (the last N steps, not only the last batch): when their success rate is
below ``success_threshold`` (default 0.8), mine new candidates from them (successes -> skills, failures ->
mistakes), merge the new candidates among themselves, then with the bank's dynamic items, and cap the
dynamic part (+``max_new_items`` per update and kind, at most ``capacity`` dynamic items per kind).
Static items (those without ``"origin": "dynamic"``, e.g. every item of a mined or shared bank) are never
changed; new items that duplicate a static item are dropped.

Every update writes the next version ``<run_dir>/bank/vNNNN.json`` (+ ``.parquet``), never overwriting
one; every decision (also the skipped ones) is appended to ``<run_dir>/bank/updates.jsonl``.  With a gate
(``--gate-split``) an update is kept only if the gate's held-out metric does not drop.

Gate metric (:class:`TeacherSuccessGate`): the teacher success rate on held-out problems.  For each
held-out problem the top-``k`` teachers retrieved from a bank each answer greedily with their teacher
prompt; the metric is the mean over problems of the teacher-weighted correctness.  It measures what the
bank is used for (conditioning teachers) with the policy itself; completions of teacher prompts that
both banks share (static items) are generated once.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from stages.engine.manifest import ProgressFn
from stages.engine.config import Checked, opt, shared_opt
from stages.engine.atomic import atomic_write_text
from stages.engine.errors import InputError
from stages.engine.locks import run_dir_lock
from stages.engine.tableio import read_table
from stages.engine.tables import POLARIZE_ROLLOUTS, ROLLOUT
from stages.engine.grading import grades_for
from stages.engine.skills.mining import ROLLOUT_REQUIRED, MiningParams, build_memories, candidate_counts, candidate_items, extract_candidates, merge_kind
from stages.engine.skills.bank import KINDS, SkillBank, load_bank
from stages.engine.skills.versions import BankVersion, bank_dir, init_bank_versions, latest_bank_version, save_bank_version, version_label
from stages.engine.skills.retrieval import make_retriever, retrieve_many
from stages.engine.skills.writer import Writer, WriterConfig, make_writer
from stages.engine.benchmarks import load_problems
from stages.engine.generation.factory import make_backend
from stages.engine.models import load_model
from stages.engine.generation.base import SamplingConfig
from stages.engine.prompts import chat_prompt_ids, teacher_prompt
from stages.engine.grading import grade_texts

_STEP_RX = re.compile(r"^step_(\d+)$")


@dataclass
class UpdateSkillsConfig(Checked):
    writer: WriterConfig = opt(help="Where the skill writer runs.", group="Writer", prefix="writer-", factory=WriterConfig)
    params: MiningParams = opt(help="Mining: extraction, merge and dedupe.", group="Mining", factory=MiningParams)
    success_threshold: float = opt(0.8, "Update only when the window's success rate is below this.", group="Update", flag="threshold", ge=0, le=1)
    max_new_items: int = opt(5, "Dynamic items added per update and kind at most.", group="Update", flag="max-new", ge=0)
    capacity: int = opt(30, "Dynamic items per kind at most.", group="Update", ge=0)
    last_steps: int | None = opt(None, "Window: rollouts of the last N step_* directories (all when unset).", group="Update", ge=1)
    model: str | None = opt(None, "The policy: the local writer by default, and the model the gate's teachers run on.", group="Model")
    gguf_file: str | None = shared_opt("gguf_file", group="Model")
    backend: str = opt("auto", "Generation backend of the gate: auto, vllm, hf.", group="Model", choices=("auto", "vllm", "hf-fast", "hf"))
    device: str = shared_opt("device", group="Model")
    dtype: str = shared_opt("dtype", group="Model")
    # gate
    gate_split: str | None = opt(None, "Held-out problems (file or benchmark name, or a rollout table): keep the update only if the teacher success rate on them does not drop.", group="Gate")
    gate_tolerance: float = opt(0.0, "Allowed drop of the gate metric.", group="Gate", ge=0)
    gate_max_problems: int = opt(32, "Held-out problems used by the gate (seeded sample).", group="Gate", ge=1)
    gate_k: int = opt(2, "Teachers per held-out problem in the gate.", group="Gate", ge=1)
    gate_retrieval: str = opt("lexical", "Retrieval mode of the gate: lexical, embedding, hybrid, random.", group="Gate", choices=("embedding", "lexical", "hybrid", "random"))
    gate_encoder: str | None = opt(None, "Encoder of the gate's embedding retrieval.", group="Gate")
    gate_max_new_tokens: int = opt(1024, "Maximum tokens of a gate teacher's answer.", group="Gate", ge=1)
    seed: int = opt(0, "Random seed (sampling, shuffling).", group="Model", ge=0)

    def check(self) -> None:
        self.params.check()
        if not 0.0 <= self.success_threshold <= 1.0:
            raise InputError(None, "--threshold must be within [0, 1]")
        if self.max_new_items < 0 or self.capacity < 0:
            raise InputError(None, "--max-new and --capacity must be non-negative")


@dataclass
class UpdateResult:
    decision: str  # updated | skipped | unchanged | gated
    reason: str
    success_rate: float | None
    rollouts: int
    version: BankVersion  # the latest version after this call
    parent: BankVersion
    stats: dict = field(default_factory=dict)
    gate: dict | None = None


# --------------------------------------------------------------------------------------------------
# the window


def window_rollouts(run_dir: str | Path, last_steps: int | None) -> list[Path]:
    """Rollout tables of the last ``last_steps`` ``step_NNNN`` directories of a run (all when None)."""
    run_dir = Path(run_dir)
    steps = sorted((int(m.group(1)), p) for p in run_dir.glob("step_*") if p.is_dir() and (m := _STEP_RX.match(p.name)))
    if last_steps is not None:
        steps = steps[-last_steps:] if last_steps > 0 else []
    out = []
    for _, d in steps:
        try:
            out.append(ROLLOUT.path(d))
        except InputError:
            continue
    if not out:
        raise InputError(run_dir, "no rollout tables found in step_* directories (pass --rollouts)")
    return out


def window_memories(paths: Sequence[Path], params: MiningParams, on_table: Callable[[int], None] | None = None) -> pl.DataFrame:
    """Memories of every rollout of the window; each table graded by its own ``correct`` column, by the
    ``polarize_rollouts.parquet`` beside it, or by the verifier."""
    parts = []
    for p in paths:
        t = read_table(p, ROLLOUT_REQUIRED)
        sibling = POLARIZE_ROLLOUTS.file(p.parent)  # beside step_N/rollout.parquet or step_N/rollout/
        grades = grades_for(t, timeout_s=params.verify_timeout_s, grades_path=sibling if sibling.exists() else None)
        parts.append(build_memories(t, params, grades=grades))
        if on_table:
            on_table(1)
    mem = pl.concat(parts, how="vertical")
    return mem.with_columns(pl.Series("memory_id", [f"mem-{i:06d}" for i in range(mem.height)], dtype=pl.String))


# --------------------------------------------------------------------------------------------------
# one update


def _is_dynamic(item: dict) -> bool:
    return item.get("origin") == "dynamic"


def _content(kind: str, item: dict) -> tuple:
    return tuple(" ".join(str(item.get(f, "")).split()).lower() for f in KINDS[kind][1][1:])


def update_kind(bank: SkillBank, kind: str, new_candidates: list[dict], writer: Writer, cfg: UpdateSkillsConfig,
                label: str) -> tuple[list[dict], dict]:
    """The new dynamic items of one kind and the stats of their merge."""
    idf, fields = KINDS[kind][1][0], KINDS[kind][1]
    items = bank.items(kind)
    static = [it for it in items if not _is_dynamic(it)]
    dyn = [it for it in items if _is_dynamic(it)]
    st: dict = {"candidates": len(new_candidates), "dynamic_before": len(dyn)}
    if not new_candidates:
        return dyn, {**st, "dynamic_after": len(dyn), "added": 0, "dropped": 0}
    fresh, s1 = merge_kind(new_candidates, kind, writer, cfg.params, against=static)
    st["merged_new"] = len(fresh)
    if not fresh:
        return dyn, {**st, "dynamic_after": len(dyn), "added": 0, "dropped": 0, "merge_new": s1}
    combined = [{f: it[f] for f in fields[1:]} for it in dyn] + fresh
    merged, s2 = merge_kind(combined, kind, writer, cfg.params, against=static) if dyn else (fresh, s1)
    cap = min(len(dyn) + cfg.max_new_items, cfg.capacity)
    kept = merged[:cap]
    # items identical to an existing dynamic item keep its id and version; the rest are new in `label`
    old = {_content(kind, it): it for it in dyn}
    used = {it[idf] for it in items}
    out, n_new = [], 0
    prefix = "dyn_gen" if kind == "skill" else "dyn_err"
    for it in kept:
        prev = old.get(_content(kind, it))
        if prev is not None:
            out.append(prev)
            continue
        n_new += 1
        new_id = f"{prefix}_{label}_{n_new:02d}"
        while new_id in used:
            n_new += 1
            new_id = f"{prefix}_{label}_{n_new:02d}"
        used.add(new_id)
        out.append({idf: new_id, **{f: it[f] for f in fields[1:]}, "origin": "dynamic", "added_in": label})
    kept_ids = {it[idf] for it in out}
    return out, {**st, "dynamic_after": len(out), "added": n_new, "capped": max(0, len(merged) - cap),
                 "dropped": sum(1 for it in dyn if it[idf] not in kept_ids), "merge_new": s1,
                 "merge_with_dynamic": s2 if dyn else None}


def propose_update(bank: SkillBank, memories: pl.DataFrame, writer: Writer, cfg: UpdateSkillsConfig, label: str,
                   on_done: Callable[[int], None] | None = None) -> tuple[SkillBank, dict]:
    """Mine the memories and return (candidate new bank, stats); static items keep their place."""
    cands = extract_candidates(memories, writer, cfg.params, on_done=on_done)
    stats: dict = {"candidates": candidate_counts(cands)}
    new_items: dict[str, list[dict]] = {}
    for kind in KINDS:
        dyn, st = update_kind(bank, kind, candidate_items(cands, kind), writer, cfg, label)
        stats[kind] = st
        new_items[kind] = [it for it in bank.items(kind) if not _is_dynamic(it)] + dyn
    meta = dict(bank.metadata)
    return SkillBank(skills=new_items["skill"], mistakes=new_items["mistake"], task_specific=bank.task_specific,
                     metadata=meta, extra=bank.extra), stats


# --------------------------------------------------------------------------------------------------
# gate


class TeacherSuccessGate:
    """Held-out teacher success rate of a bank (see the module docstring)."""
    def __init__(self, backend, tokenizer, problems: pl.DataFrame, *, k: int = 2, retrieval: str = "lexical",
                 encoder: str | None = None, max_new_tokens: int = 1024, verify_timeout_s: float = 5.0, seed: int = 0):
        self.backend, self.tokenizer = backend, tokenizer
        self.problems = problems
        self.k, self.retrieval, self.encoder, self.seed = k, retrieval, encoder, seed
        self.max_new_tokens, self.verify_timeout_s = max_new_tokens, verify_timeout_s
        self._cache: dict[str, bool] = {}  # teacher prompt (it embeds the problem) -> correct

    def score(self, bank: SkillBank) -> float:

        probs, golds = self.problems["problem"].to_list(), [str(a) for a in self.problems["answer"].to_list()]
        pools = retrieve_many(make_retriever(bank, self.retrieval, encoder=self.encoder, seed=self.seed), probs, k=self.k)
        texts = [[teacher_prompt(p, t.skill, t.mistake) for t in pool] for p, pool in zip(probs, pools)]
        gold_of = {t: golds[i] for i, row in enumerate(texts) for t in row}
        todo = [t for t in dict.fromkeys(t for row in texts for t in row) if t not in self._cache]
        if todo:
            ids = [chat_prompt_ids(self.tokenizer, t, thinking=False) for t in todo]
            comps = self.backend.generate(ids, SamplingConfig(n=1, temperature=0.0, max_new_tokens=self.max_new_tokens))
            grades = grade_texts([c.text for c in comps], [gold_of[t] for t in todo], timeout_s=self.verify_timeout_s)
            for t, g in zip(todo, grades):
                self._cache[t] = bool(g.correct)
        self.generated = len(self._cache)
        per_problem = [sum(tch.weight * float(self._cache[t]) for tch, t in zip(pool, row))
                       for pool, row in zip(pools, texts)]
        return sum(per_problem) / max(1, len(per_problem))

    def __call__(self, old: SkillBank, new: SkillBank) -> dict:
        o, n = self.score(old), self.score(new)
        return {"metric": "teacher_success_rate", "problems": self.problems.height, "k": self.k,
                "retrieval": self.retrieval, "old": o, "new": n, "completions": len(self._cache)}


def load_gate_problems(path: str, max_problems: int, seed: int = 0) -> pl.DataFrame:
    """Held-out problems: a problems file / benchmark name (id, problem, answer) or a rollout table
    (one row per problem is kept)."""

    p = Path(path)
    if p.exists() and p.suffix == ".parquet" or p.is_dir():
        df = read_table(p, {"problem": str, "answer": str})
        key = "problem_id" if "problem_id" in df.columns else "problem"
        df = df.unique(key, keep="first", maintain_order=True).select("problem", "answer")
    else:
        df = load_problems(path).select("problem", "answer")
    if df.height > max_problems:
        df = df.sample(n=max_problems, seed=seed, shuffle=True)
    return df


# --------------------------------------------------------------------------------------------------
# stage entry point


def _log(run_dir: Path, entry: dict) -> None:
    path = bank_dir(run_dir) / "updates.jsonl"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + json.dumps(entry, ensure_ascii=False, default=str) + "\n")


WRITER_MAX_NEW_TOKENS = 2048  # online-update writer reply budget of the reference (skill/skill_updater.py:47)


def run(cfg: UpdateSkillsConfig, run_dir: str | Path, *, rollouts: Sequence[str | Path] | None = None,
        bank: str | Path | None = None, progress: ProgressFn | None = None, loaded=None, backend=None,
        writer: Writer | None = None, gate: Callable[[SkillBank, SkillBank], dict] | None = None) -> UpdateResult:
    """One update of the run's bank; writes the next ``bank/vNNNN`` only when the bank changes.

    ``loaded`` = (model, tokenizer, spec): the resident policy (local writer when no ``--writer-url``, and
    the gate's model); ``backend``: its resident generation backend, reused instead of starting another.
    ``gate(old, new) -> {"old": x, "new": y, ...}`` overrides ``cfg.gate_split``.  The run directory is locked
    for the update (the next version number and ``updates.jsonl`` are read, then written)."""
    cfg.check()
    with run_dir_lock(run_dir):
        return _update(cfg, Path(run_dir), rollouts=rollouts, bank=bank, progress=progress, loaded=loaded,
                       backend=backend, writer=writer, gate=gate)


def _update(cfg: UpdateSkillsConfig, run_dir: Path, *, rollouts, bank, progress, loaded, backend, writer,
            gate) -> UpdateResult:
    latest = latest_bank_version(run_dir)
    if latest is None:
        if bank is None:
            raise InputError(bank_dir(run_dir), "the run has no bank history yet: pass --bank (it becomes v0000)")
        latest = init_bank_versions(run_dir, load_bank(bank))
    elif bank is not None:
        given, cur = load_bank(bank), latest.load()
        if given.version != cur.version:
            raise InputError(bank, f"is not this run's latest bank version {latest.label} ({cur.version}); "
                                   f"omit --bank to update the latest version")
    current = latest.load()
    paths = [Path(p) for p in rollouts] if rollouts else window_rollouts(run_dir, cfg.last_steps)
    adv = progress("grade window", len(paths)) if progress else None
    mem = window_memories(paths, cfg.params, on_table=adv)
    rate = float(mem["correct"].mean()) if mem.height else None
    label = version_label(latest.number + 1)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "from_version": latest.label, "bank_version": current.version,
             "rollout_tables": [str(p) for p in paths], "rollouts": mem.height, "success_rate": rate,
             "threshold": cfg.success_threshold}

    def done(decision: str, reason: str, version: BankVersion, stats=None, gate_res=None) -> UpdateResult:
        _log(run_dir, {**entry, "decision": decision, "reason": reason, "to_version": version.label,
                       "stats": stats, "gate": gate_res})
        return UpdateResult(decision, reason, rate, mem.height, version, latest, stats or {}, gate_res)

    if rate is None or rate >= cfg.success_threshold:
        why = "no rollouts" if rate is None else f"success rate {rate:.3f} >= threshold {cfg.success_threshold:g}"
        return done("skipped", why, latest)

    if writer is None:
        from dataclasses import replace

        wcfg = cfg.writer
        if wcfg.max_new_tokens is None:  # the reference's online-update writer budget (skill/skill_updater.py:47)
            wcfg = replace(wcfg, max_new_tokens=WRITER_MAX_NEW_TOKENS)
        if not wcfg.url and not wcfg.model:
            wcfg = replace(wcfg, model=cfg.model, gguf_file=wcfg.gguf_file or cfg.gguf_file)
        same = loaded is not None and (wcfg.model is None or wcfg.model == cfg.model)
        use = same and not wcfg.url
        writer = make_writer(wcfg, loaded=loaded if use else None, backend=backend if use else None)
    adv = progress("extract candidates", mem.height) if progress else None
    new_bank, stats = propose_update(current, mem, writer, cfg, label, on_done=adv)
    if new_bank.version == current.version:
        return done("unchanged", "no new items survived merging and deduplication", latest, stats)

    gate_res = None
    if gate is None and cfg.gate_split:
        gate = _make_gate(cfg, loaded, backend)
    if gate is not None:
        gate_res = gate(current, new_bank)
        gate_res["tolerance"] = cfg.gate_tolerance
        if gate_res["new"] < gate_res["old"] - cfg.gate_tolerance:
            return done("gated", f"held-out {gate_res.get('metric', 'metric')} fell from {gate_res['old']:.4f} "
                                 f"to {gate_res['new']:.4f}", latest, stats, gate_res)
    info = {"kind": "online_update", "success_rate": rate, "rollouts": mem.height, "stats": stats, "gate": gate_res,
            "config": {"threshold": cfg.success_threshold, "max_new_items": cfg.max_new_items, "capacity": cfg.capacity}}
    version = save_bank_version(run_dir, new_bank, info=info, label=label)
    return done("updated", f"success rate {rate:.3f} < threshold {cfg.success_threshold:g}", version, stats, gate_res)


def _make_gate(cfg: UpdateSkillsConfig, loaded, backend=None) -> TeacherSuccessGate:

    if loaded is None:
        backend = None
        if not cfg.model:
            raise InputError(None, "--gate-split needs --model (the policy that answers with the teacher prompts)")

        loaded = load_model(cfg.model, cfg.gguf_file, device=cfg.device, dtype=cfg.dtype)
    model, tok, spec = loaded
    problems = load_gate_problems(cfg.gate_split, cfg.gate_max_problems, cfg.seed)
    if backend is None:
        backend = make_backend(cfg.backend, model=model, tokenizer=tok, spec=spec)
    return TeacherSuccessGate(backend, tok, problems, k=cfg.gate_k, retrieval=cfg.gate_retrieval,
                              encoder=cfg.gate_encoder, max_new_tokens=cfg.gate_max_new_tokens,
                              verify_timeout_s=cfg.params.verify_timeout_s, seed=cfg.seed)
