"""`sgsd score-teachers`: log-probs of each rollout's tokens under the student and K skill-conditioned teachers.

For every rollout the teacher pool is retrieved from the skill bank (docs/DESIGN.md 1.2), K teacher prompts are
built, and the scoring core computes fp32 log-probs of the student's completion tokens under the student
prompt (one forward per rollout, shared by all its teachers) and under each teacher prompt.  Output: one
row per (rollout, teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl

from stages.engine.io import DATA_DIR, StageRun, read_table, shard_output_name, stage_table_path
from stages.engine.prompts import chat_prompt_text, teacher_prompt
from stages.engine.scoring import Segment, score_segments
from stages.engine.skills.versions import bank_version_of
from stages.engine.skills.bank import load_bank
from stages.engine.skills.retrieval import make_retriever, retrieve_many

ROLLOUT_COLUMNS = {"rollout_id": str, "problem_id": str, "problem": str, "prompt_ids": list, "completion_ids": list}

SCORE_SCHEMA = {
    "rollout_id": pl.String,
    "problem_id": pl.String,
    "teacher_rank": pl.Int64,
    "skill_id": pl.String,
    "mistake_id": pl.String,
    "skill_score": pl.Float64,
    "mistake_score": pl.Float64,
    "weight": pl.Float64,
    "teacher_prompt": pl.String,
    "teacher_prompt_ids": pl.List(pl.Int64),
    "student_logprobs": pl.List(pl.Float64),
    "teacher_logprobs": pl.List(pl.Float64),
    "scoring_temperature": pl.Float64,
    "retrieval_mode": pl.String,
    "bank_version": pl.String,
}


@dataclass
class ScoreTeachersConfig:
    model: str
    bank: str = str(DATA_DIR / "demo" / "skill_bank.json")
    gguf_file: str | None = None
    index: str | None = None
    retrieval: str = "lexical"
    encoder: str | None = None
    k: int = 8
    weight_temperature: float = 1.0
    scoring_temperature: float = 1.0
    token_budget: int = 16384
    logit_chunk: int = 2048
    rollouts_per_batch: int = 16
    seed: int = 0
    shard: tuple[int, int] = (0, 1)
    device: str = "auto"
    dtype: str = "auto"


def score_table(
    model,
    tokenizer,
    rollouts: pl.DataFrame,
    retriever,
    cfg: ScoreTeachersConfig,
    on_done: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """In-process scoring of a rollout table; the loop calls this with its resident model."""
    thinking = rollouts["thinking"].to_list() if "thinking" in rollouts.columns else [False] * rollouts.height
    problems = rollouts["problem"].to_list()
    pools = retrieve_many(retriever, problems, k=cfg.k, temperature=cfg.weight_temperature)
    rows: dict[str, list] = {k: [] for k in SCORE_SCHEMA}
    bank_version = retriever.bank.version
    recs = rollouts.select("rollout_id", "problem_id", "prompt_ids", "completion_ids").to_dicts()
    for start in range(0, len(recs), cfg.rollouts_per_batch):
        chunk = range(start, min(start + cfg.rollouts_per_batch, len(recs)))
        segs: list[Segment] = []
        t_prompts: list[list[tuple[str, list[int]]]] = []
        for i in chunk:
            r = recs[i]
            segs.append(Segment.of(r["prompt_ids"], r["completion_ids"]))  # one student forward per rollout
            tp = []
            for t in pools[i]:
                text = chat_prompt_text(tokenizer, teacher_prompt(problems[i], t.skill, t.mistake), thinking[i])
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                tp.append((text, ids))
                segs.append(Segment.of(ids, r["completion_ids"]))
            t_prompts.append(tp)
        lps = score_segments(model, segs, temperature=cfg.scoring_temperature,
                             token_budget=cfg.token_budget, logit_chunk=cfg.logit_chunk)
        pos = 0
        for j, i in enumerate(chunk):
            r = recs[i]
            student = lps[pos].tolist()
            pos += 1
            for t, (text, ids) in zip(pools[i], t_prompts[j]):
                rows["rollout_id"].append(r["rollout_id"])
                rows["problem_id"].append(r["problem_id"])
                rows["teacher_rank"].append(t.rank)
                rows["skill_id"].append(t.skill["skill_id"])
                rows["mistake_id"].append(t.mistake["mistake_id"])
                rows["skill_score"].append(t.skill_score)
                rows["mistake_score"].append(t.mistake_score)
                rows["weight"].append(t.weight)
                rows["teacher_prompt"].append(text)
                rows["teacher_prompt_ids"].append(ids)
                rows["student_logprobs"].append(student)
                rows["teacher_logprobs"].append(lps[pos].tolist())
                rows["scoring_temperature"].append(cfg.scoring_temperature)
                rows["retrieval_mode"].append(retriever.mode)
                rows["bank_version"].append(bank_version)
                pos += 1
        if on_done:
            on_done(len(chunk))
    return pl.DataFrame(rows, schema=SCORE_SCHEMA)


def run(
    cfg: ScoreTeachersConfig,
    run_dir: str | Path,
    *,
    rollouts: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    loaded=None,
) -> Path:
    from stages.engine.models import load_model

    src = Path(rollouts) if rollouts else stage_table_path(run_dir, "rollout")
    table = read_table(src, ROLLOUT_COLUMNS)
    i, n = cfg.shard
    if n > 1:
        table = table.with_row_index("_r").filter(pl.col("_r") % n == i).drop("_r")
    bank = load_bank(cfg.bank)
    inputs = {"rollouts": src, "bank": cfg.bank, "index": cfg.index}
    stage = StageRun(run_dir, "score_teachers", cfg, inputs=inputs, force=force, seed=cfg.seed,
                     output_name=shard_output_name("score_teachers", cfg.shard))
    if stage.done:
        return stage.output
    retriever = make_retriever(bank, mode=cfg.retrieval, index_path=cfg.index, encoder=cfg.encoder, seed=cfg.seed)
    model, tok, spec = loaded or load_model(cfg.model, cfg.gguf_file, device=cfg.device, dtype=cfg.dtype)
    advance = progress("score-teachers", table.height) if progress else None
    df = score_table(model, tok, table, retriever, cfg, on_done=advance)
    stage.finish(df, extra={"model": spec.to_json(), "bank_version": bank.version,
                            "bank_label": bank_version_of(cfg.bank), "teachers_per_rollout": cfg.k})
    return stage.output
