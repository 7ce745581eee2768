"""`sgsd mine-skills`: build a skill bank from the model's own graded attempts.  docs/DESIGN.md 1.1.

Three steps, each writing its own table under ``--run-dir`` (with a manifest, so a rerun resumes):

1. ``memories.parquet``: one row per graded attempt (problem, completion excerpt, predicted and gold
   answer, outcome).  Attempts come from a rollout table (``sgsd rollout`` on training problems); when
   none is given, ``mine-skills`` samples one itself (reference: 256 training problems, T=1.0, top_p 0.95).
2. ``candidates.parquet``: the writer turns each success into 1-3 general skills and each failure into
   1-3 common mistakes.  One row per item; a reply that yields no item is kept as one row with its
   ``parse_status`` (empty / unparsable / no_items) and the ``raw`` reply.  Never fatal.
3. ``skill_bank.parquet`` + ``skill_bank.json``: hierarchical merge (groups of 32, repeated on the result
   until one group is left or 3 consecutive layers do not shrink), then exact dedupe and near-duplicate
   removal with rapidfuzz, ids ``gen_001``/``err_001``.  The JSON has the shared banks' format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


import polars as pl

from stages.engine.config import Checked, opt, shared_opt
from stages.engine.atomic import atomic_write_text
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.tableio import read_table
from stages.engine.tables import ROLLOUT
from stages.engine.skills.bank import bank_json_text, bank_to_table, load_bank
from stages.engine.skills.writer import Writer, WriterConfig, make_writer
from stages.engine.grading import grades_for
from stages.engine.skills.mining import MiningParams, ROLLOUT_REQUIRED, template_texts, build_memories, candidate_counts, extract_candidates, merge_candidates
from stages.engine.benchmarks import load_problems
from stages.rollout import RolloutConfig
from stages.rollout import run as rollout_run
from stages.engine.models import load_model


@dataclass
class MineSkillsConfig(Checked):
    writer: WriterConfig = opt(help="Where the skill writer runs (an endpoint or a local model).", group="Writer", prefix="writer-", factory=WriterConfig)
    params: MiningParams = opt(help="Mining: extraction, merge and dedupe.", group="Mining", factory=MiningParams)
    # sampling, when no rollout table is given (docs/DESIGN.md 1.1 step 1)
    model: str | None = opt(None, "Policy model that samples the attempts (and, by default, writes the skills).", group="Attempts")
    gguf_file: str | None = shared_opt("gguf_file", group="Attempts")
    problems: str = opt("train", "Problems to sample from: a file with id, problem, answer or a benchmark name.", group="Attempts")
    n_problems: int = opt(256, "Problems sampled (seeded) when mining from the model's own attempts.", group="Attempts", ge=1)
    temperature: float = opt(1.0, "Sampling temperature of the attempts.", group="Attempts", ge=0)
    top_p: float = opt(0.95, "Nucleus mass of the attempts.", group="Attempts", gt=0, le=1)
    top_k: int = opt(0, "Top-k of the attempts (0 = off).", group="Attempts", ge=0)
    max_new_tokens: int = opt(38912, "Maximum tokens of one attempt (the reference's 38,912: skill/generate_math_memories.py:36).", group="Attempts", ge=1)
    thinking: bool = opt(True, "Qwen3 thinking mode for the attempts (on: the reference samples with the default chat template, generate_math_memories.py:151).", group="Attempts")
    backend: str = opt("auto", "Generation backend of the attempts: auto, vllm, hf.", group="Attempts", choices=("auto", "vllm", "hf-fast", "hf"))
    batch_size: int = opt(32, "Decode batch: sequences generated together (transformers backends).", group="Attempts", ge=1, flag="decode-batch", old=("--batch-size",))
    device: str = shared_opt("device", group="Attempts")
    dtype: str = shared_opt("dtype", group="Attempts")
    seed: int = opt(0, "Random seed (sampling, shuffling).", group="Attempts", ge=0)




# --------------------------------------------------------------------------------------------------
# sampling when no rollout table is given


def _load_problems(spec: str) -> pl.DataFrame:

    return load_problems(spec)


def sample_attempts(cfg: MineSkillsConfig, run_dir: Path, *, force: bool = False, progress: ProgressFn | None = None,
                    loaded=None) -> Path:
    """Roll out the model once on a seeded sample of ``n_problems`` problems (``sgsd rollout``'s engine)."""
    if not cfg.model:
        raise InputError(None, "mine-skills needs --rollouts (a graded rollout table) or --model to sample attempts")
    problems = _load_problems(cfg.problems)
    if problems.height > cfg.n_problems:
        problems = problems.sample(n=cfg.n_problems, seed=cfg.seed, shuffle=True)
    sub = run_dir / "mine_problems.jsonl"
    text = "".join(json.dumps({"id": str(r["id"]), "problem": r["problem"], "answer": str(r["answer"])},
                              ensure_ascii=False) + "\n" for r in problems.select("id", "problem", "answer").to_dicts())
    if not sub.exists() or sub.read_text(encoding="utf-8") != text:
        atomic_write_text(sub, text)
    rcfg = RolloutConfig(model=cfg.model, problems=str(sub), gguf_file=cfg.gguf_file, n=1, temperature=cfg.temperature,
                         top_p=cfg.top_p, top_k=cfg.top_k, max_new_tokens=cfg.max_new_tokens, thinking=cfg.thinking,
                         seed=cfg.seed, backend=cfg.backend, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype)
    return rollout_run(rcfg, run_dir, force=force, progress=progress, loaded=loaded)


# --------------------------------------------------------------------------------------------------
# stage entry point


@dataclass
class MineResult:
    bank_json: Path
    bank_parquet: Path
    memories: Path
    candidates: Path
    summary: dict


WRITER_MAX_NEW_TOKENS = 4096  # mining writer reply budget of the reference (skill/generate_math_skills.py:33)


def run(cfg: MineSkillsConfig, run_dir: str | Path, *, rollouts: str | Path | None = None, grades: str | Path | None = None,
        force: bool = False, progress: ProgressFn | None = None, loaded=None, backend=None,
        writer: Writer | None = None) -> MineResult:
    """Run (or resume) the three steps; returns the paths and a summary.

    ``loaded`` = (model, tokenizer, spec) of a resident model, used to sample and, when the writer is the
    same local model, to write (through ``backend`` when given: its resident generation engine).
    ``writer`` overrides ``cfg.writer`` (tests, the loop)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.params.check()
    if rollouts is None:
        if loaded is None and not ROLLOUT.file(run_dir).exists():

            loaded = load_model(cfg.model, cfg.gguf_file, device=cfg.device, dtype=cfg.dtype) if cfg.model else None
        rollouts = sample_attempts(cfg, run_dir, force=force, progress=progress, loaded=loaded)
    rollouts = Path(rollouts)
    p = cfg.params
    templates = template_texts()
    summary: dict = {}

    # 1. memories
    s1 = StageRun(run_dir, "mine_memories", {"excerpt_chars": p.excerpt_chars, "verify_timeout_s": p.verify_timeout_s},
                  inputs={"rollouts": rollouts, "grades": grades}, force=force, output_name="memories")
    if not s1.done:
        table = read_table(rollouts, ROLLOUT_REQUIRED)
        adv = progress("grade attempts", table.height) if progress else None
        g = grades_for(table, timeout_s=p.verify_timeout_s, grades_path=Path(grades) if grades else None, on_done=adv)
        mem = build_memories(table, p, grades=g)
        counts = {"attempts": mem.height, "successes": int(mem["correct"].sum()),
                  "failures": int((~mem["correct"]).sum()),
                  "status": {k: int(v) for k, v in mem["status"].value_counts().iter_rows()}}
        s1.finish(mem, extra={"counts": counts})
    mem = read_table(s1.output, {"memory_id": str, "correct": bool}, allow_empty=True)
    summary["memories"] = {"attempts": mem.height, "successes": int(mem["correct"].sum())}

    def get_writer() -> Writer:
        nonlocal writer
        if writer is None:
            wcfg = cfg.writer
            if not wcfg.url and not wcfg.model:
                wcfg = replace(wcfg, model=cfg.model, gguf_file=wcfg.gguf_file or cfg.gguf_file)
            use = loaded is not None and wcfg.model == cfg.model and not wcfg.url
            writer = make_writer(wcfg, loaded=loaded if use else None, backend=backend if use else None)
        return writer

    if cfg.writer.max_new_tokens is None:  # the reference's mining writer budget (generate_math_skills.py:33)
        cfg = replace(cfg, writer=replace(cfg.writer, max_new_tokens=WRITER_MAX_NEW_TOKENS))
    wdesc = writer.describe() if writer is not None else cfg.writer.describe()
    if writer is None and not cfg.writer.url and not cfg.writer.model:
        wdesc["model"] = cfg.model  # the local writer defaults to the sampled model (reference)

    # 2. candidates
    c_cfg = {"writer": wdesc, "max_items_per_attempt": p.max_items_per_attempt,
             "templates": {k: templates[k] for k in ("extract_skill", "extract_mistake")}}
    s2 = StageRun(run_dir, "mine_candidates", c_cfg, inputs={"memories": s1.output}, force=force, output_name="candidates")
    if not s2.done:
        adv = progress("extract candidates", mem.height) if progress else None
        cands = extract_candidates(mem, get_writer(), p, on_done=adv)
        s2.finish(cands, extra={"counts": candidate_counts(cands), "writer_url": cfg.writer.url})
    cands = read_table(s2.output, {"memory_id": str, "kind": str, "parse_status": str}, allow_empty=True)
    summary["candidates"] = candidate_counts(cands)

    # 3. merge
    m_cfg = {"writer": wdesc, "merge_group_size": p.merge_group_size, "merge_patience": p.merge_patience,
             "near_duplicate_threshold": p.near_duplicate_threshold,
             "templates": {k: templates[k] for k in ("merge_skills", "merge_mistakes")}}
    s3 = StageRun(run_dir, "mine_merge", m_cfg, inputs={"candidates": s2.output}, force=force, output_name="skill_bank")
    bank_json = run_dir / "skill_bank.json"
    if not s3.done:
        source = f"sgsd mine-skills from {rollouts} using {cfg.writer.url + ':' if cfg.writer.url else ''}{wdesc.get('model')}"
        bank = merge_candidates(cands, get_writer(), p, source=source)
        atomic_write_text(bank_json, bank_json_text(bank))
        s3.finish(bank_to_table(bank), rows=len(bank.skills) + len(bank.mistakes),
                  extra={"bank_version": bank.version, "bank_json": bank_json.name,
                         "skills": len(bank.skills), "mistakes": len(bank.mistakes)})
    elif not bank_json.exists():  # resumed: the JSON copy was removed, rewrite it from the Parquet bank
        atomic_write_text(bank_json, bank_json_text(load_bank(s3.output)))
    bank = load_bank(bank_json)
    summary["bank"] = {"skills": len(bank.skills), "mistakes": len(bank.mistakes), "version": bank.version,
                       "merge_failures": bank.metadata.get("merge_failures"),
                       "exact_duplicates_removed": bank.metadata.get("exact_duplicates_removed"),
                       "near_duplicates_removed": bank.metadata.get("near_duplicates_removed")}
    return MineResult(bank_json, s3.output, s1.output, s2.output, summary)
