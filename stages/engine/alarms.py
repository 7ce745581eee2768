"""Collapse alarms: each loop step's metrics against the run's own history (docs/DESIGN.md 2, "Alarms").

Three outcome trends and five health trends, each computed from ``metrics.parquet`` rows only (so a resumed run
recomputes the same alarms).  The outcome trends:

* ``reward``:  the mean training reward of the last ``W`` steps is below the best ``W``-step mean so far by
  ``REWARD_DROP`` (0.3) or by three standard errors of a window mean, whichever is larger, counting the
  window's prompts (the ``prompts`` column; 16 a step if absent) as independent: ``3 sqrt(b (1 - b) / n)``.
  W = 5: with 16 prompts a step the floor 0.3 rules; GRPO's 2 prompts x 8 need a drop of about 0.4.
* ``eval``:    a benchmark's avg@n is ``EVAL_DROP`` or more below its best earlier eval of the run (0.15).
* ``polarity`` (SGSD): over the last ``W`` steps, over-suppressive teachers (a correct rollout whose teachers
  push the other way, rho = -1) are at least ``OVER_SUPPRESSIVE`` of the teacher-rollout pairs (0.4) while
  helpful ones are at most ``HELPFUL_MAX`` (0.05): the reversed term dominates the loss.

The outcome bands were set on the skill world's comparison (bench/SKILL_WORLD_RESULTS.md, 120 runs, in-sample): they
fire before the end in every run whose seen-family accuracy fell below 0.6 (6 of 6) and in 7 of 84 runs that
ended healthy; tighter bands (0.2 / 0.10 / 0.3 / 0.1) caught 12 of 16 runs with any drop past 5 points but
fired in 32 of the 84 healthy ones.  ``tests/test_alarms.py`` checks them by hand.

Five health trends (the per-step metrics of stages/engine/health.py), each against the run's own history: the
current value is the mean of the last ``W`` steps; "the running median" is the median of every earlier step's
value (the steps before that window; at least ``W`` of them), "the early level" the mean of the run's first
``W`` steps (so the window and the early level do not overlap: from step 2W on).

* ``length``:     ``completion_len_mean``'s window mean is ``LEN_FACTOR`` (2) times its running median or more,
  or 1/2 of it or less.  Reasoning RL lengthens completions slowly; a doubling or halving within a few steps is a
  collapse (repetition up to the token limit, or answers without reasoning).
* ``truncation``: ``truncated_frac``'s window mean is above its running median by ``TRUNC_RISE`` (0.10, 10
  points) or three binomial standard errors of a window mean, whichever is larger (``3 sqrt(p (1 - p) / n)``,
  p the median, n the window's rollouts: the ``rollouts`` column, 128 a step if absent).
* ``format``:     ``format_rate`` (boxed answer present) is below its running median by ``FORMAT_DROP`` (0.10)
  or three standard errors (as truncation).
* ``entropy``:    the token entropy (``entropy_mean``, the trainer's full-distribution entropy; a run without it
  uses ``sampled_nll_mean``, the rollout table's estimate) falls to ``ENTROPY_LOW`` (0.25) of its early level
  or below (entropy collapse: the policy stops exploring), or rises to ``ENTROPY_HIGH`` (3) times it or above
  (blow-up: the policy drifts towards noise).
* ``teacher weights`` (SGSD): the mean entropy of each rollout's teacher weights (``teacher_weight_entropy``)
  falls to ``TW_ENTROPY_LOW`` (0.5) of its early level or below: retrieval now hands one teacher nearly all
  the weight.

These five bands are a first guess, not fitted on any run: no run of ours has logged format rate, token entropy
or teacher-weight entropy yet, and length and truncation were not checked against the skill world's runs (whose
completions are a few tokens long).  The reasoning: a collapse is a large, fast move (the DAPO paper's entropy
without clip-higher falls towards 0 within the first hundred or so steps; degenerate repetition runs lengths to
the token limit), a healthy run drifts slowly, so the bands are wide ratios (2x, 1/4, 3x, 1/2) or 10 points,
smoothed over 5 steps, with binomial floors so a small batch's noise does not fire.  Refit them once runs log
the metrics.
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
# health trends (first guesses, not fitted: see the module docstring)
LEN_FACTOR = 2.0
TRUNC_RISE = 0.10
FORMAT_DROP = 0.10
DEFAULT_ROLLOUTS = 128
ENTROPY_LOW = 0.25
ENTROPY_HIGH = 3.0
TW_ENTROPY_LOW = 0.5


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
    return out + health_alarms(rows, i)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    m = len(s) // 2
    return s[m] if len(s) % 2 else (s[m - 1] + s[m]) / 2


def _against_history(rows: Sequence[dict], i: int, key: str) -> tuple[float, list[float]] | None:
    """(the window mean of ``key`` at step i, the values of the steps before the window) when the window is full
    and at least WINDOW earlier values exist."""
    xs = [_num(r.get(key)) for r in rows]
    cur = _window_mean(xs, i)
    before = [v for v in xs[: max(0, i - WINDOW + 1)] if v is not None]
    return (cur, before) if cur is not None and len(before) >= WINDOW else None


def _against_early(rows: Sequence[dict], i: int, key: str) -> tuple[float, float] | None:
    """(the window mean of ``key`` at step i, its mean over the run's first WINDOW steps) from step 2W on."""
    xs = [_num(r.get(key)) for r in rows]
    if i - WINDOW + 1 < WINDOW:
        return None
    cur, early = _window_mean(xs, i), _window_mean(xs, WINDOW - 1)
    return (cur, early) if cur is not None and early is not None and early > 0 else None


def _binomial_band(rows: Sequence[dict], i: int, p: float, floor: float) -> float:
    n = sum(_num(r.get("rollouts")) or DEFAULT_ROLLOUTS for r in rows[i - WINDOW + 1 : i + 1])
    return max(floor, 3.0 * math.sqrt(min(max(p, 0.0), 1.0) * (1.0 - min(max(p, 0.0), 1.0)) / n))


def health_alarms(rows: Sequence[dict], i: int) -> list[str]:
    """The health-trend alarms of step ``rows[i]`` (length, truncation, format, entropy, teacher weights)."""
    out: list[str] = []
    h = _against_history(rows, i, "completion_len_mean")
    if h is not None:
        cur, med = h[0], _median(h[1])
        if med > 0 and (cur >= LEN_FACTOR * med - 1e-9 or cur <= med / LEN_FACTOR + 1e-9):
            out.append(f"length: last-{WINDOW}-step mean {cur:.0f} tokens, {cur / med:.2f}x its running median {med:.0f}")
    h = _against_history(rows, i, "truncated_frac")
    if h is not None:
        cur, med = h[0], _median(h[1])
        if cur - med >= _binomial_band(rows, i, med, TRUNC_RISE) - 1e-12:
            out.append(f"truncation: last-{WINDOW}-step mean {cur:.0%} of rollouts cut at the token limit, "
                       f"up from a running median of {med:.0%}")
    h = _against_history(rows, i, "format_rate")
    if h is not None:
        cur, med = h[0], _median(h[1])
        if med - cur >= _binomial_band(rows, i, med, FORMAT_DROP) - 1e-12:
            out.append(f"format: last-{WINDOW}-step mean {cur:.0%} of rollouts with a boxed answer, "
                       f"down from a running median of {med:.0%}")
    key = "entropy_mean" if any(_num(r.get("entropy_mean")) is not None for r in rows) else "sampled_nll_mean"
    e = _against_early(rows, i, key)
    if e is not None:
        cur, early = e
        what = "token entropy" if key == "entropy_mean" else "sampled-token NLL"
        if cur <= ENTROPY_LOW * early + 1e-12 or cur >= ENTROPY_HIGH * early - 1e-12:
            out.append(f"entropy: {what} last-{WINDOW}-step mean {cur:.3f} nats, {cur / early:.2f}x its "
                       f"first-{WINDOW}-step level {early:.3f}")
    e = _against_early(rows, i, "teacher_weight_entropy")
    if e is not None:
        cur, early = e
        if cur <= TW_ENTROPY_LOW * early + 1e-12:
            out.append(f"teacher weights: entropy last-{WINDOW}-step mean {cur:.3f} nats, {cur / early:.2f}x its "
                       f"first-{WINDOW}-step level {early:.3f}")
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
