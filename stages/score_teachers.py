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

from stages.engine.config import Checked, opt, shared_opt
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.tableio import check_finite, read_table, shard_output_name, shard_rows
from stages.engine.prompts import chat_prompt_text, strip_wrappers, teacher_prompt, teacher_thinking_flag
from stages.engine.scoring import Segment, score_segments
from stages.engine.skills.versions import bank_version_of
from stages.engine.skills.bank import load_bank, require_pairs
from stages.engine.skills.retrieval import make_retriever, retrieve_many
from stages.engine.models import load_model
from stages.engine.objectives.sgsd import method_field, method_of
from stages.engine.tables import ROLLOUT, SCORE_SCHEMA, SCORE_TEACHERS
from stages.engine.models import check_token_ids

ROLLOUT_COLUMNS = {"rollout_id": str, "problem_id": str, "problem": str, "prompt_ids": list, "completion_ids": list}



@dataclass
class ScoreTeachersConfig(Checked):
    model: str = opt(help="The policy (student = teacher weights): HF folder, hub id, .gguf, or adapter folder.", group="Model")
    bank: str = opt("", "Skill bank JSON (format of shared/data/skill_banks/*.json), required: a paper run names its bank (e.g. ../shared/data/skill_banks/sgsd_qwen3_1.7b.json); smoke runs and tests the tiny demo bank data/demo/skill_bank.json.", group="Teachers")
    gguf_file: str | None = shared_opt("gguf_file", group="Model")
    index: str | None = opt(None, "Index built by `sgsd build-index` (refused if built from another bank version).", group="Teachers")
    retrieval: str = opt("embedding", "embedding (the paper's, with Qwen/Qwen3-Embedding-0.6B) | lexical (no-model fallback for smoke runs and tests) | hybrid | random.", group="Teachers", choices=("embedding", "lexical", "hybrid", "random"))
    encoder: str | None = opt(None, "Sentence encoder for embedding retrieval without an index (default Qwen/Qwen3-Embedding-0.6B, the paper's).", group="Teachers")
    query_prompt: bool = opt(False, "Encode retrieval queries with the encoder's 'query' prompt (default: the raw problem, as the reference does).", group="Teachers")  # reference skill_memory.py:179-184 encodes the raw text
    teacher_thinking: str = opt("on", "Chat-template thinking flag of the teacher prompts: on (the reference: enable_thinking=True while the student is non-thinking), off, or rollout (the rollout's own flag).", group="Teachers", choices=("on", "off", "rollout"))  # reference sgsd_trainer.py:195-200
    k: int = method_field("k", group="Teachers")
    weight_temperature: float = method_field("weight_temperature", group="Teachers")
    scoring_temperature: float = opt(1.0, "Temperature of the scored log-probs (recorded in every row).", group="Scoring", gt=0)
    token_budget: int = opt(16384, "Tokens per packed micro-batch of the scoring core.", group="Scoring", ge=1)
    logit_chunk: int = opt(2048, "Positions per fp32 log-softmax chunk.", group="Scoring", ge=1)
    rollouts_per_batch: int = opt(16, "Rollouts whose student + K teacher sequences are scored together.", group="Scoring", ge=1)
    seed: int = opt(0, "Seed of --retrieval random (its scores); recorded in the manifest. Scoring itself draws nothing.", group="Scoring", ge=0)
    shard: tuple[int, int] = opt((0, 1), "i/n: score the i-th of n contiguous blocks of the rollouts; writes score_teachers/part-i-of-n.parquet (the parts in order are the unsharded table).", group="Scoring", metavar="i/n")
    device: str = shared_opt("device", group="Model")
    dtype: str = shared_opt("dtype", group="Model")


def teacher_thinking_flags(mode: str, rollouts: pl.DataFrame) -> list[bool]:
    """The thinking flag of each rollout's teacher prompts (:func:`stages.engine.prompts.teacher_thinking_flag`)."""
    own = rollouts["thinking"].to_list() if "thinking" in rollouts.columns else [False] * rollouts.height
    return [teacher_thinking_flag(mode, bool(x)) for x in own]


def score_table(
    model,
    tokenizer,
    rollouts: pl.DataFrame,
    retriever,
    cfg: ScoreTeachersConfig,
    on_done: Callable[[int], None] | None = None,
    on_retrieved: Callable[[int], None] | None = None,
) -> pl.DataFrame:
    """In-process scoring of a rollout table; the loop calls this with its resident model.  ``on_done(n)``:
    rollouts scored; ``on_retrieved(n)``: distinct problems whose teachers were retrieved."""
    thinking = teacher_thinking_flags(cfg.teacher_thinking, rollouts)
    problems = rollouts["problem"].to_list()
    method = method_of(cfg)
    pools = retrieve_many(retriever, problems, k=method.k, temperature=method.weight_temperature, on_done=on_retrieved)
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
    progress: ProgressFn | None = None,
    loaded=None,
) -> Path:

    src = Path(rollouts) if rollouts else ROLLOUT.path(run_dir)
    table = read_table(src, ROLLOUT_COLUMNS)
    check_finite(table, ["sample_logprobs"], src, "rollout_id", nulls_ok=True)  # what train reads later
    table = shard_rows(table, cfg.shard)
    if table.height and not table["completion_ids"].list.len().max():
        raise InputError(src, f"every completion is empty (0 tokens in {table.height} rollouts): there is nothing to "
                              "score; nothing written")
    if not cfg.bank:
        raise InputError(None, "--bank is required: a skill bank JSON (the paper's: ../shared/data/skill_banks/"
                               "sgsd_qwen3_1.7b.json; smoke runs: data/demo/skill_bank.json)")
    bank = load_bank(cfg.bank)

    require_pairs(bank, cfg.bank)
    inputs = {"rollouts": src, "bank": cfg.bank, "index": cfg.index}
    stage = StageRun(run_dir, SCORE_TEACHERS.name, cfg, inputs=inputs, force=force, seed=cfg.seed,
                     output_name=shard_output_name(SCORE_TEACHERS.name, cfg.shard))
    if stage.done:
        return stage.output
    retriever = make_retriever(bank, mode=cfg.retrieval, index_path=cfg.index, encoder=cfg.encoder, seed=cfg.seed,
                               query_prompt=cfg.query_prompt)
    model, tok, spec = loaded or load_model(cfg.model, cfg.gguf_file, device=cfg.device, dtype=cfg.dtype)

    vocab = model.get_input_embeddings().num_embeddings
    check_token_ids([(r, c, ids) for c in ("prompt_ids", "completion_ids")
                     for r, ids in zip(table["rollout_id"].to_list(), table[c].to_list())], vocab, src)
    retrieved = progress("retrieve", len(set(map(strip_wrappers, table["problem"].to_list())))) if progress else None
    advance = progress("score-teachers", table.height) if progress else None
    df = score_table(model, tok, table, retriever, cfg, on_done=advance, on_retrieved=retrieved)
    if df.height == 0:
        raise InputError(cfg.bank, "no teacher could be formed for any rollout (0 rows); nothing written")
    stage.finish(df, extra={"model": spec.to_json(), "bank_version": bank.version,
                            "bank_label": bank_version_of(cfg.bank), "teachers_per_rollout": cfg.k,
                            "teacher_thinking": cfg.teacher_thinking, "retrieval_mode": retriever.mode,
                            "query_prompt": cfg.query_prompt})
    return stage.output
