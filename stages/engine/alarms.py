"""Collapse alarms: each loop step's metrics against the run's own history (docs/DESIGN.md 2, "Alarms").

Three trends, each computed from ``metrics.parquet`` rows only (so a resumed run recomputes the same alarms):

* ``reward``:  the mean training reward of the last ``W`` steps is below the best ``W``-step mean so far by
  ``REWARD_DROP`` (0.3) or by three standard errors of a window mean, whichever is larger, counting the
  window's prompts (the ``prompts`` column; 16 a step if absent) as independent: ``3 sqrt(b (1 - b) / n)``.
  W = 5: with 16 prompts a step the floor 0.3 rules; GRPO's 2 prompts x 8 need a drop of about 0.4.
* ``eval``:    a benchmark's avg@n is ``EVAL_DROP`` or more below its best earlier eval of the run (0.15).
* ``polarity`` (SGSD): over the last ``W`` steps, over-suppressive teachers (a correct rollout whose teachers
  push the other way, rho = -1) are at least ``OVER_SUPPRESSIVE`` of the teacher-rollout pairs (0.4) while
  helpful ones are at most ``HELPFUL_MAX`` (0.05): the reversed term dominates the loss.

The bands were set on the skill world's comparison (bench/SKILL_WORLD_RESULTS.md, 120 runs, in-sample): they
fire before the end in every run whose seen-family accuracy fell below 0.6 (6 of 6) and in 7 of 84 runs that
ended healthy; tighter bands (0.2 / 0.10 / 0.3 / 0.1) caught 12 of 16 runs with any drop past 5 points but
fired in 32 of the 84 healthy ones.  ``tests/test_alarms.py`` checks them by hand.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

WINDOW = 5
REWARD_DROP = 0.3
DEFAULT_PROMPTS = 16
EVAL_DROP = 0.15
OVER_SUPPRESSIVE = 0.4
HELPFUL_MAX = 0.05


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(float(x)) else None


def _window_mean(xs: Sequence[float | None], end: int, w: int = WINDOW) -> float | None:
    """Mean of xs[end-w+1 .. end] when all w values exist."""
    if end + 1 < w:
        return None
    vals = [xs[j] for j in range(end - w + 1, end + 1)]
    return None if any(v is None for v in vals) else sum(vals) / w  # type: ignore[arg-type]


def step_alarms(rows: Sequence[dict], i: int) -> list[str]:
    """The alarms of step ``rows[i]`` given the rows before it (one short phrase each)."""
    out: list[str] = []
    rewards = [_num(r.get("reward")) for r in rows]
    cur = _window_mean(rewards, i)
    if cur is not None:
        best = max((m for m in (_window_mean(rewards, j) for j in range(i)) if m is not None), default=None)
        n = sum(_num(r.get("prompts")) or DEFAULT_PROMPTS for r in rows[i - WINDOW + 1 : i + 1])
        drop = max(REWARD_DROP, 3.0 * math.sqrt(best * (1.0 - best) / n)) if best is not None else REWARD_DROP
        if best is not None and best - cur >= drop - 1e-12:
            out.append(f"reward: last-{WINDOW}-step mean {cur:.2f}, down from {best:.2f}")
    for key in sorted(k for k in rows[i] if k.startswith("eval_") and k.endswith("_avg_at_n")):
        now = _num(rows[i].get(key))
        if now is None:
            continue
        before = [v for v in (_num(r.get(key)) for r in rows[:i]) if v is not None]
        if before and max(before) - now >= EVAL_DROP - 1e-12:
            out.append(f"{key[5:-9]} avg@n {now:.2f}, down from {max(before):.2f}")
    over = _window_mean([_num(r.get("frac_over_suppressive")) for r in rows], i)
    helpful = _window_mean([_num(r.get("frac_helpful")) for r in rows], i)
    if over is not None and helpful is not None and over >= OVER_SUPPRESSIVE and helpful <= HELPFUL_MAX:
        out.append(f"polarity: {over:.0%} of teacher pairs over-suppressive, {helpful:.0%} helpful (last {WINDOW} steps)")
    return out


def alarm_column(rows: Sequence[dict]) -> list[str]:
    """Per row: its alarms joined by '; ' ('' when none)."""
    return ["; ".join(step_alarms(rows, i)) for i in range(len(rows))]


def new_alarms(rows: Sequence[dict]) -> list[str]:
    """The last row's alarms that the row before did not have (what the loop prints once)."""
    if not rows:
        return []
    now = step_alarms(rows, len(rows) - 1)
    before = {a.split(":")[0] for a in step_alarms(rows, len(rows) - 2)} if len(rows) > 1 else set()
    return [a for a in now if a.split(":")[0] not in before]
