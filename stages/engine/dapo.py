"""DAPO's batch rules for the GRPO baseline (Yu et al. 2025, arXiv 2503.14476), each once.  Off by default: the
reference's GRPO run uses none of them.

* **dynamic sampling** (DAPO section 3.2): a group (the G rollouts of one prompt) whose rewards are all equal
  (``max - min <= tol``) has zero group-normalised advantage and no policy-gradient signal; it is dropped, and
  more prompts are drawn until ``target`` informative groups are in hand or the draw budget is spent.
  :func:`filter_groups` keeps the first ``target`` informative groups in draw order (verl's recipe cuts the
  batch to ``train_batch_size`` the same way); the rest are ``surplus``.  A group of one rollout is dropped too
  (``group_advantages`` gives it advantage 0); verl keeps it, which matters only for rollout.n = 1, where
  dynamic sampling means nothing.  :func:`extra_prompts` sizes the next draw from the keep rate seen so far:
  ``ceil(missing * drawn / max(kept, 1))``, at least ``missing``, at most what the budget leaves (verl draws
  whole generation batches and stops with an error past ``max_num_gen_batches``; here the step trains on what
  it has when the budget is spent, and ``ds_drop_frac`` shows it).
* **overlong filtering** (DAPO section 3.4): a rollout cut at the token limit (``finish_reason == "length"``) is
  masked out of the loss: every token's mask is 0 (TRL's ``mask_truncated_completions``).  Under token-mean
  aggregation its tokens leave the normaliser; under sequence-mean it still counts in the batch's sequence count
  with a zero term (as TRL's ``loss_type=grpo`` divides by the batch size).
* **clip-higher** (DAPO section 3.1) is ``train.clip_eps_high`` (objectives/grpo.py ``clipped_surrogate``; DAPO:
  eps_low 0.2, eps_high 0.28) and token-level loss is ``train.loss_agg = token-mean``: both exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence


# ---- dynamic sampling ----------------------------------------------------------------------------------------

def group_rewards(rewards: Sequence[float], group_ids: Sequence[Hashable]) -> dict[Hashable, list[float]]:
    """Rewards per group, groups in first-appearance order; a non-finite reward is refused (ValueError)."""
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards for {len(group_ids)} group ids")
    out: dict[Hashable, list[float]] = {}
    for r, g in zip(rewards, group_ids):
        r = float(r)
        if not math.isfinite(r):
            raise ValueError(f"group {g!r}: non-finite reward {r}")
        out.setdefault(g, []).append(r)
    return out


def is_informative(rewards: Sequence[float], tol: float = 0.0) -> bool:
    """A group carries a learning signal: at least two rollouts and ``max - min > tol``."""
    return len(rewards) >= 2 and max(rewards) - min(rewards) > tol


@dataclass(frozen=True)
class GroupFilter:
    """Dynamic sampling's verdict on the groups drawn so far (ids in draw order)."""
    kept: list = field(default_factory=list)      # informative, trained on (at most ``target``)
    surplus: list = field(default_factory=list)   # informative beyond ``target`` (not trained on)
    dropped: list = field(default_factory=list)   # all rewards equal (or a group of one)

    @property
    def drawn(self) -> int:
        return len(self.kept) + len(self.surplus) + len(self.dropped)

    @property
    def drop_frac(self) -> float:
        """Share of the drawn groups dropped as uninformative (the ``ds_drop_frac`` metric); 0 for none drawn."""
        return len(self.dropped) / self.drawn if self.drawn else 0.0


def filter_groups(rewards: Sequence[float], group_ids: Sequence[Hashable], target: int | None = None, *,
                  tol: float = 0.0) -> GroupFilter:
    """Split the groups drawn so far (rollouts of every draw of the step, in draw order) into kept / surplus /
    dropped; ``target=None``: keep every informative group."""
    if target is not None and target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    kept, surplus, dropped = [], [], []
    for g, rs in group_rewards(rewards, group_ids).items():
        if not is_informative(rs, tol):
            dropped.append(g)
        elif target is None or len(kept) < target:
            kept.append(g)
        else:
            surplus.append(g)
    return GroupFilter(kept, surplus, dropped)


def rollout_keep(group_ids: Sequence[Hashable], kept: Sequence[Hashable]) -> list[bool]:
    """Per rollout: its group is kept."""
    k = set(kept)
    return [g in k for g in group_ids]


def extra_prompts(target: int, kept: int, drawn: int, *, extra_drawn: int, max_extra: int) -> int:
    """How many more prompts to draw this step: 0 when ``kept >= target`` or the budget of ``max_extra`` extra
    prompts (beyond the step's first draw) is spent; else ``ceil(missing * drawn / max(kept, 1))`` (the missing
    groups over the keep rate seen so far, a rate of 1/drawn when nothing was kept), at least ``missing``, at
    most the budget left (``max_extra - extra_drawn``).  Counts are in prompts (= groups), over all ranks."""
    for name, v in (("target", target), ("kept", kept), ("drawn", drawn), ("extra_drawn", extra_drawn),
                    ("max_extra", max_extra)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if kept > drawn:
        raise ValueError(f"kept ({kept}) > drawn ({drawn})")
    missing, left = target - kept, max_extra - extra_drawn
    if missing <= 0 or left <= 0:
        return 0
    want = -(-missing * drawn // max(kept, 1)) if drawn else missing
    return min(max(want, missing), left)


def dynamic_sampling_metrics(f: GroupFilter, rounds: int, target: int) -> dict[str, float | int]:
    """The step's metrics: groups drawn / kept / dropped, the dropped share, the extra draw rounds, and whether
    the batch came out short of ``target`` (the budget ran out)."""
    return {"ds_groups_drawn": f.drawn, "ds_groups_kept": len(f.kept), "ds_groups_dropped": len(f.dropped),
            "ds_drop_frac": f.drop_frac, "ds_rounds": rounds, "ds_short": int(len(f.kept) < target)}


# ---- overlong filtering --------------------------------------------------------------------------

def overlong_keep(finish_reasons: Sequence[str | None], enabled: bool = True) -> list[bool]:
    """Per rollout: its tokens stay in the loss (False for ``finish_reason == "length"`` when ``enabled``)."""
    return [not (enabled and f == "length") for f in finish_reasons]


def overlong_token_mask(token_mask: Sequence[bool], finish_reason: str | None, enabled: bool = True) -> list[bool]:
    """One rollout's per-token loss mask after overlong filtering: all False when it was truncated."""
    keep = overlong_keep([finish_reason], enabled)[0]
    return [bool(m) and keep for m in token_mask]
