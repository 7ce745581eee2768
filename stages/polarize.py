"""`sgsd polarize`: verify each rollout and turn each teacher's log-prob gap into a polarity.  docs/DESIGN.md 1.4.

Per (rollout, teacher): Delta = teacher - student log-probs, token mask m, support a_k, stance sigma_k,
outcome o (verifier), polarity rho_k = o * sigma_k, its category (helpful / warning / misleading /
over_suppressive / neutral) and the clipped-token fraction.  A second table has one row per rollout
with the grade and the category counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from stages.engine.grading import grade_rollouts
from stages.engine.config import Checked, opt, shared_opt
from stages.engine.atomic import write_parquet
from stages.engine.errors import InputError
from stages.engine.manifest import ProgressFn, StageRun
from stages.engine.tableio import check_finite, read_table
from stages.engine.objectives.sgsd import (CATEGORIES, category, clipped_fraction, delta, maskable_token_ids,
                                          method_field, method_of, polarity, stance, support_score, token_mask)
from stages.engine.models import ModelSpec, load_tokenizer
from stages.engine.tables import POLARIZE, POLARIZE_ROLLOUTS, POLARIZE_SCHEMA, ROLLOUT, SCORE_TEACHERS



@dataclass
class PolarizeConfig(Checked):
    model: str | None = opt(None, "Model whose tokenizer defines the token mask (default: the rollout table's model).", group="Model")
    gguf_file: str | None = shared_opt("gguf_file", group="Model")
    verify_timeout_s: float = opt(5.0, "Hard timeout per verifier call, seconds (a timeout scores 0 and is counted).", group="Verifier", gt=0, flag="verify-timeout")
    workers: int | None = opt(None, "Verifier worker processes (default: CPU count).", group="Verifier", ge=1)
    clip: float = method_field("clip", group="Polarity")
    stance_threshold: float = method_field("stance_threshold", group="Polarity")


def polarize_tables(
    rollouts: pl.DataFrame,
    scores: pl.DataFrame,
    tokenizer,
    cfg: PolarizeConfig,
    on_done: Callable[[int], None] | None = None,
    scores_path: str | Path | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per (rollout, teacher) table, per rollout table).  ``scores_path`` names the score table in errors."""
    grades = grade_rollouts(rollouts, timeout_s=cfg.verify_timeout_s, workers=cfg.workers)
    method = method_of(cfg)
    special, newline = maskable_token_ids(tokenizer)
    masks = {r: token_mask(ids, special, newline)
             for r, ids in zip(rollouts["rollout_id"].to_list(), rollouts["completion_ids"].to_list())}
    correct = dict(zip(grades["rollout_id"].to_list(), grades["correct"].to_list()))
    rows: dict[str, list] = {k: [] for k in POLARIZE_SCHEMA}
    for r in scores.select("rollout_id", "teacher_rank", "weight", "student_logprobs", "teacher_logprobs").iter_rows(named=True):
        rid = r["rollout_id"]
        if rid not in masks:
            raise InputError(scores_path, f"score-teachers row for rollout '{rid}' has no rollout in the rollout table")
        m = torch.tensor(masks[rid], dtype=torch.bool)
        s = torch.tensor(r["student_logprobs"], dtype=torch.float64)
        t = torch.tensor(r["teacher_logprobs"], dtype=torch.float64)
        if not (len(s) == len(t) == len(m)):
            raise InputError(scores_path, f"rollout '{rid}' teacher {r['teacher_rank']}: {len(m)} completion tokens "
                                          f"but {len(s)} student / {len(t)} teacher log-probs")
        d = delta(t, s)
        a = float(support_score(d, m, method.clip))
        sig = int(stance(a, method.stance_threshold))
        o = 1 if correct[rid] else -1
        n_mask = int(m.sum())
        rows["rollout_id"].append(rid)
        rows["teacher_rank"].append(r["teacher_rank"])
        rows["weight"].append(r["weight"])
        rows["correct"].append(correct[rid])
        rows["outcome"].append(o)
        rows["support"].append(a)
        rows["stance"].append(sig)
        rows["polarity"].append(polarity(o, sig))
        rows["category"].append(category(o, sig))
        rows["token_mask"].append(masks[rid])
        rows["n_mask"].append(n_mask)
        rows["clipped_frac"].append(float(clipped_fraction(d, m, method.clip)))
    per_teacher = pl.DataFrame(rows, schema=POLARIZE_SCHEMA)
    counts = (
        per_teacher.group_by("rollout_id")
        .agg([(pl.col("category") == c).sum().cast(pl.Int64).alias(f"n_{c}") for c in CATEGORIES]
             + [pl.col("support").mean().alias("mean_support"), pl.col("clipped_frac").mean().alias("mean_clipped_frac")])
    )
    per_rollout = grades.join(counts, on="rollout_id", how="left").with_columns(
        [pl.col(f"n_{c}").fill_null(0) for c in CATEGORIES]
    )
    if on_done:
        on_done(rollouts.height)
    return per_teacher, per_rollout


def run(
    cfg: PolarizeConfig,
    run_dir: str | Path,
    *,
    rollouts: str | Path | None = None,
    scores: str | Path | None = None,
    force: bool = False,
    progress: ProgressFn | None = None,
    tokenizer=None,
) -> Path:

    r_src = Path(rollouts) if rollouts else ROLLOUT.path(run_dir)
    s_src = Path(scores) if scores else SCORE_TEACHERS.path(run_dir)
    rt = read_table(r_src, {"rollout_id": str, "completion": str, "answer": str, "completion_ids": list, "model": str})
    st = read_table(s_src, {"rollout_id": str, "teacher_rank": int, "weight": float,
                            "student_logprobs": list, "teacher_logprobs": list})
    # NaN / inf log-probs would make every support NaN and every teacher "neutral": refuse them here
    check_finite(st, ["weight", "student_logprobs", "teacher_logprobs"], s_src, "rollout_id")
    stage = StageRun(run_dir, POLARIZE.name, cfg, inputs={"rollouts": r_src, "scores": s_src}, force=force)
    if stage.done:
        return stage.output
    if tokenizer is None:
        spec = ModelSpec.parse(cfg.model or rt["model"][0], cfg.gguf_file)
        spec.check()
        tokenizer = load_tokenizer(spec)
    advance = progress("polarize", rt.height) if progress else None
    per_teacher, per_rollout = polarize_tables(rt, st, tokenizer, cfg, on_done=advance, scores_path=s_src)
    write_parquet(per_rollout, POLARIZE_ROLLOUTS.file(run_dir))
    summary = {
        "accuracy": float(per_rollout["correct"].mean()) if per_rollout.height else 0.0,
        "categories": {c: int((per_teacher["category"] == c).sum()) for c in CATEGORIES},
        "grade_status": {k: int(v) for k, v in per_rollout["status"].value_counts().iter_rows()},
    }
    stage.finish(per_teacher, extra={"summary": summary, "rollout_table": POLARIZE_ROLLOUTS.file(run_dir).name})
    return stage.output


def grade(cfg: PolarizeConfig, run_dir: str | Path, *, rollouts: str | Path | None = None, force: bool = False,
          progress: ProgressFn | None = None) -> Path:
    """Grade-only polarize (objectives without teachers): ``polarize_rollouts.parquet`` and no teacher table."""
    src = Path(rollouts) if rollouts else ROLLOUT.path(run_dir)
    stage = StageRun(run_dir, "grade", {"verify_timeout_s": cfg.verify_timeout_s}, inputs={"rollouts": src},
                     output_name=POLARIZE_ROLLOUTS.name, force=force)
    if stage.done:
        return stage.output
    rt = read_table(src, {"rollout_id": str, "completion": str, "answer": str})
    advance = progress("grade", rt.height) if progress else None
    stage.finish(grade_rollouts(rt, timeout_s=cfg.verify_timeout_s, workers=cfg.workers, on_done=advance))
    return stage.output
