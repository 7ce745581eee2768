"""The tables a run directory holds, each declared once: name, producer, schema.  docs/DESIGN.md 3 and SCHEMAS.md.

Producers write and consumers read a table through its entry here (``ROLLOUT.path(run_dir)``, ``POLARIZE.file(run_dir)``),
never by spelling its file name; :mod:`stages.engine.step_metrics` turns a finished step's tables into the loop's
``metrics.parquet`` row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from stages.engine.tableio import stage_table_path

ROLLOUT_SCHEMA = {
    "rollout_id": pl.String,
    "problem_id": pl.String,
    "sample_index": pl.Int64,
    "problem": pl.String,
    "answer": pl.String,
    "prompt": pl.String,
    "prompt_ids": pl.List(pl.Int64),
    "completion": pl.String,
    "completion_ids": pl.List(pl.Int64),
    "sample_logprobs": pl.List(pl.Float64),
    "finish_reason": pl.String,
    "model": pl.String,
    "policy_step": pl.Int64,
    "temperature": pl.Float64,
    "top_p": pl.Float64,
    "top_k": pl.Int64,
    "thinking": pl.Boolean,
    "backend": pl.String,
}

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

POLARIZE_SCHEMA = {
    "rollout_id": pl.String,
    "teacher_rank": pl.Int64,
    "weight": pl.Float64,
    "correct": pl.Boolean,
    "outcome": pl.Int64,
    "support": pl.Float64,
    "stance": pl.Int64,
    "polarity": pl.Int64,
    "category": pl.String,
    "token_mask": pl.List(pl.Boolean),
    "n_mask": pl.Int64,
    "clipped_frac": pl.Float64,
}


@dataclass(frozen=True)
class Table:
    """One table of a run directory: ``<run_dir>/<name>.parquet`` (or its ``<name>/`` part directory when sharded)
    with ``<name>.manifest.json``.  ``wall``: the ``wall_<wall>_s`` column of the loop's row (its manifest's time)."""
    name: str
    producer: str
    schema: dict | None = None
    sharded: bool = False
    wall: str | None = None

    def file(self, run_dir: str | Path) -> Path:
        """The unsharded file (what a producer writes, or a consumer tests for)."""
        return Path(run_dir) / f"{self.name}.parquet"

    def path(self, run_dir: str | Path) -> Path:
        """The file or, for a sharded stage, its part directory; InputError naming the producer when neither exists."""
        return stage_table_path(run_dir, self.name)

    def manifest(self, run_dir: str | Path) -> Path:
        return Path(run_dir) / f"{self.name}.manifest.json"

    def find(self, run_dir: str | Path) -> Path | None:
        """The file or the part directory, None when neither exists."""
        d = Path(run_dir)
        return self.file(d) if self.file(d).exists() else (d / self.name if (d / self.name).is_dir() else None)

    def exists(self, run_dir: str | Path) -> bool:
        return self.find(run_dir) is not None


PROBLEMS = Table("problems", "loop")
ROLLOUT = Table("rollout", "rollout", ROLLOUT_SCHEMA, sharded=True, wall="rollout")
SCORE_TEACHERS = Table("score_teachers", "score-teachers", SCORE_SCHEMA, sharded=True, wall="score_teachers")
POLARIZE = Table("polarize", "polarize", POLARIZE_SCHEMA, wall="polarize")
POLARIZE_ROLLOUTS = Table("polarize_rollouts", "polarize (or its grade-only form)", wall="grade")
TRAIN = Table("train", "train", wall="train")
TRAIN_OLD_LOGPROBS = Table("train_old_logprobs", "train (grpo: the pi_old cache)")
EVAL_SUMMARY = Table("eval/summary", "eval")
METRICS = Table("metrics", "loop")
TRAIN_BATCH = Table("train_batch", "loop (grpo dynamic sampling: the kept groups of every draw of the step, with reward)")

TABLES = {t.name: t for t in (PROBLEMS, ROLLOUT, SCORE_TEACHERS, POLARIZE, POLARIZE_ROLLOUTS, TRAIN, TRAIN_OLD_LOGPROBS,
                              EVAL_SUMMARY, METRICS, TRAIN_BATCH)}

# JSON files the loop leaves in a step directory
ENGINE_PROBE = "engine_probe.json"
SKILLS_UPDATE = "skills_update.json"
DYNAMIC_SAMPLING = "dynamic_sampling.json"  # grpo dynamic sampling: the step's ds_* metrics (stages/engine/dapo.py)
DS_ROUND = "ds_round_{:02d}"  # grpo dynamic sampling: the folder of extra draw r (its problems, rollout, grades)
