"""The loop's ``metrics.parquet`` row of one step, from the step's tables (stages/engine/tables.py).  docs/DESIGN.md 3.

Each table's part of the row is one function here (``TABLE_METRICS``); :func:`step_metrics` assembles the row in one
fixed column order.  The row is a function of the finished tables, not of the process that wrote them, so a
restarted loop and ``sgsd report`` on a stage-by-stage run rebuild the rows of earlier steps exactly as the loop
wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import polars as pl

from stages.engine import agreement
from stages.engine.manifest import read_manifest
from stages.engine.tableio import read_table
from stages.engine.objectives.sgsd import CATEGORIES
from stages.engine.health import rollout_health, teacher_weight_entropy, train_entropy_mean
from stages.engine.tables import (DYNAMIC_SAMPLING, ENGINE_PROBE, EVAL_SUMMARY, POLARIZE, POLARIZE_ROLLOUTS, ROLLOUT,
                                  SCORE_TEACHERS, SKILLS_UPDATE, TRAIN)


def _train_metrics(sd: Path) -> dict:
    tr = pl.read_parquet(TRAIN.file(sd))
    row: dict[str, Any] = {"policy_step": int(tr["policy_step"][-1]), "optimizer_steps": tr.height,
                           "loss": float(tr["loss"].mean()), "grad_norm": float(tr["grad_norm"].mean()),
                           "lr": float(tr["lr"][-1]), "train_tokens": int(tr["tokens"].sum()),
                           "tokens_per_s": float(tr["tokens"].sum() / max(1e-9, tr["wall_s"].sum()))}
    for k in agreement.COLUMNS:  # measured before the first update on the table: the pure engine/trainer gap
        if k in tr.columns:
            v = tr[k][0]
            row[k] = (int(v) if k == "agree_tokens" else float(v)) if v is not None else (0 if k == "agree_tokens" else float("nan"))
    return row


def _rollout_metrics(sd: Path) -> dict:
    """The step's first draw (its ``rollout`` table): counts and the health columns (stages/engine/health.py:
    completion length, truncation, format rate, sampled-token NLL).  Dynamic sampling's extra draws are not in
    them, so a run with and one without it compare on the same kind of draw."""
    path = ROLLOUT.path(sd)
    ro = read_table(path)
    row: dict[str, Any] = {"rollouts": ro.height, "prompts": int(ro["problem_id"].n_unique())}
    row.update(rollout_health(ro, path))
    return row


def _health_train_metrics(sd: Path) -> dict:
    """The trainer's token entropy of the step (mask-token-weighted over its optimizer steps)."""
    e = train_entropy_mean(pl.read_parquet(TRAIN.file(sd)))
    return {} if e is None else {"entropy_mean": e}


def _teacher_metrics(sd: Path) -> dict:
    """SGSD: the mean entropy of each rollout's teacher weights (score_teachers table)."""
    if not SCORE_TEACHERS.exists(sd):
        return {}
    path = SCORE_TEACHERS.path(sd)
    h = teacher_weight_entropy(read_table(path, {"rollout_id": str, "weight": float}), path)
    return {} if h is None else {"teacher_weight_entropy": h}


def _dynamic_sampling_metrics(sd: Path) -> dict:
    """GRPO dynamic sampling (stages/engine/dapo.py): the loop's record of the step's draws."""
    f = sd / DYNAMIC_SAMPLING
    if not f.exists():
        return {}
    d = json.loads(f.read_text())
    return {k: (float(v) if k == "ds_drop_frac" else int(v)) for k, v in d.items() if k.startswith("ds_")}


def _grade_metrics(sd: Path) -> dict:
    if not POLARIZE_ROLLOUTS.file(sd).exists():
        return {}
    return {"reward": float(pl.read_parquet(POLARIZE_ROLLOUTS.file(sd))["correct"].cast(pl.Float64).mean())}


def _polarize_metrics(sd: Path) -> dict:
    if not POLARIZE.file(sd).exists():
        return {}
    pt = pl.read_parquet(POLARIZE.file(sd))
    row = {f"frac_{c}": float((pt["category"] == c).mean()) for c in CATEGORIES}
    row["support_mean"] = float(pt["support"].mean())
    row["support_abs_mean"] = float(pt["support"].abs().mean())
    row["clipped_frac"] = float(pt["clipped_frac"].mean())
    return row


def _eval_metrics(sd: Path) -> dict:
    row = {}
    walls = [w for m in sorted((sd / "eval").glob("*.manifest.json")) if (w := stage_wall(m)) is not None]
    if walls:  # every benchmark's generation and grading plus the summary, not the summary alone
        row["wall_eval_s"] = sum(walls)
    if EVAL_SUMMARY.file(sd).exists():
        summ = pl.read_parquet(EVAL_SUMMARY.file(sd))
        if "avg_at_n" in summ.columns and "bench" in summ.columns:
            for b, v in zip(summ["bench"].to_list(), summ["avg_at_n"].to_list()):
                row[f"eval_{b}_avg_at_n"] = v
    return row


TABLE_METRICS: dict[str, Callable[[Path], dict]] = {
    TRAIN.name: _train_metrics, ROLLOUT.name: _rollout_metrics, POLARIZE_ROLLOUTS.name: _grade_metrics,
    POLARIZE.name: _polarize_metrics, EVAL_SUMMARY.name: _eval_metrics, SCORE_TEACHERS.name: _teacher_metrics,
}


def stage_wall(manifest: Path) -> float | None:
    """Wall time of a stage: its manifest's, or for a sharded stage (``<stage>/part-*.manifest.json``, one per
    rank) the slowest part's, which is what the ranks waited for."""
    parts = sorted(manifest.with_suffix("").with_suffix("").glob("part-*.manifest.json"))
    walls = []
    for m in ([manifest] if manifest.exists() else []) + parts:
        try:
            walls.append(float(read_manifest(m).get("wall_time_s")))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            pass
    return max(walls) if walls else None


def step_metrics(sd: Path, n: int, objective: str) -> dict:
    """One row of the loop's metrics.parquet from a finished step's tables and manifests."""
    row: dict[str, Any] = {"step": n, "objective": objective}
    row.update(_train_metrics(sd))
    if (sd / ENGINE_PROBE).exists():
        pr = json.loads((sd / ENGINE_PROBE).read_text())
        row.update({"probe_gap_mean": float(pr["gap_mean"]), "probe_gap_max": float(pr["gap_max"])})
    row.update(_rollout_metrics(sd))
    row.update(_health_train_metrics(sd))
    row.update(_grade_metrics(sd))
    row.update(_dynamic_sampling_metrics(sd))
    if objective == "sgsd":
        row.update(_polarize_metrics(sd))
        row.update(_teacher_metrics(sd))
    if TRAIN.manifest(sd).exists():
        row["bank_version"] = read_manifest(TRAIN.manifest(sd)).get("bank_version")
    for t in (ROLLOUT, SCORE_TEACHERS, POLARIZE, POLARIZE_ROLLOUTS, TRAIN):
        w = stage_wall(t.manifest(sd))
        if w is not None:
            row[f"wall_{t.wall}_s"] = w
    row.update(_eval_metrics(sd))
    if (sd / SKILLS_UPDATE).exists():
        u = json.loads((sd / SKILLS_UPDATE).read_text())
        row["skills_decision"] = u.get("decision")
        row["wall_skills_s"] = u.get("wall_s")
    return row
