"""Grading of rollout tables, in one place: every stage that needs a verdict (polarize, mine-skills, the
online update, GRPO rewards in train, the loop's grade-only step) goes through :func:`grade_rollouts`
with the timeout it was configured with.  docs/DESIGN.md 1.3.

The grade table has one row per rollout: ``rollout_id, correct, status, pred`` (``status`` is the
verifier's: correct / wrong / no_answer / timeout / error, or ``given`` for grades read from a table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import polars as pl

from stages.engine.errors import InputError
from stages.engine.tableio import read_table
from stages.engine.verify import extract_answer, grade_many

GRADE_SCHEMA = {"rollout_id": pl.String, "correct": pl.Boolean, "status": pl.String, "pred": pl.String}
DEFAULT_TIMEOUT_S = 5.0


def _ids(rollouts: pl.DataFrame) -> list[str]:
    if "rollout_id" in rollouts.columns:
        return [str(r) for r in rollouts["rollout_id"].to_list()]
    return [f"attempt-{i}" for i in range(rollouts.height)]


def grade_texts(completions: list[str], golds: list[str], *, timeout_s: float = DEFAULT_TIMEOUT_S,
                workers: int | None = None, on_done: Callable[[int], None] | None = None) -> list:
    """Verdicts (:class:`stages.engine.verify.Grade`) of completions against golds: eval and the update gate.
    ``on_done(n)`` is called as answers are graded (progress)."""
    return grade_many(list(zip(completions, [str(g) for g in golds])), timeout_s=timeout_s, workers=workers,
                      progress=on_done or False)


def grade_rollouts(rollouts: pl.DataFrame, *, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
                   on_done: Callable[[int], None] | None = None) -> pl.DataFrame:
    """Verify every ``completion`` against its ``answer`` (math-verify under a hard timeout)."""
    grades = grade_texts(rollouts["completion"].to_list(), rollouts["answer"].to_list(), timeout_s=timeout_s,
                         workers=workers, on_done=on_done)
    return pl.DataFrame({"rollout_id": _ids(rollouts), "correct": [g.correct for g in grades],
                         "status": [g.status for g in grades], "pred": [g.pred for g in grades]}, schema=GRADE_SCHEMA)


def grades_for(rollouts: pl.DataFrame, *, timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None,
               grades_path: Path | None = None, on_done: Callable[[int], None] | None = None) -> pl.DataFrame:
    """The grade table of a rollout table, reusing grades where they exist.

    The table's own ``correct`` (and ``pred``/``status``) columns when it is graded, else a grade table
    with ``rollout_id, correct`` (``polarize_rollouts.parquet``) when given, else :func:`grade_rollouts`."""
    n = rollouts.height
    if "correct" in rollouts.columns:
        correct = [bool(c) for c in rollouts["correct"].to_list()]
        pred = (rollouts["pred"].cast(pl.String).to_list() if "pred" in rollouts.columns
                else [extract_answer(c or "") for c in rollouts["completion"].to_list()])
        status = rollouts["status"].to_list() if "status" in rollouts.columns else ["given"] * n
    elif grades_path is not None and "rollout_id" in rollouts.columns:
        g = read_table(grades_path, {"rollout_id": str, "correct": bool})
        cols = ["rollout_id", "correct"] + [c for c in ("pred", "status") if c in g.columns]
        j = rollouts.select("rollout_id").join(g.select(cols), on="rollout_id", how="left", maintain_order="left")
        if j["correct"].null_count():
            missing = j.filter(pl.col("correct").is_null())["rollout_id"][0]
            raise InputError(grades_path, f"no grade for rollout '{missing}'")
        correct = j["correct"].to_list()
        pred = j["pred"].to_list() if "pred" in j.columns else [None] * n
        status = j["status"].to_list() if "status" in j.columns else ["given"] * n
    else:
        return grade_rollouts(rollouts, timeout_s=timeout_s, workers=workers, on_done=on_done)
    if on_done:
        on_done(n)
    return pl.DataFrame({"rollout_id": _ids(rollouts), "correct": correct, "status": status, "pred": pred},
                        schema=GRADE_SCHEMA)
