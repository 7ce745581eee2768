"""Per-step health metrics of a training run, the inputs of the collapse alarms (stages/engine/alarms.py).

Each is a formula over one loop step's tables (or, for the token entropy, the trainer's hidden states):

* ``completion_len_mean`` / ``completion_len_max``: completion tokens per rollout (``completion_ids``, EOS
  included when the model stopped).
* ``truncated_frac``: share of rollouts with ``finish_reason == "length"`` (cut at max_new_tokens).
* ``format_rate``: share of rollouts whose completion holds a boxed answer the grader would read: the last
  brace-matched ``\\boxed{..}`` / ``\\fbox{..}`` (or ``\\boxed 5``) as ``verify.py`` extracts it, at most
  ``MAX_ANSWER_CHARS`` long.  An "Answer: ..." line alone does not count (the eval's ``format_rate`` counts it).
* ``sampled_nll_mean``: ``-(1/sum_r T_r) sum_r sum_t log p(y_t)`` over the rollout table's stored sampling
  log-probs (``log_softmax(logits / T)`` at the sampled token, before top-k/top-p).  With untruncated sampling
  (top_p = 1, top_k = 0) it is an unbiased estimate of the mean per-token entropy below (E_{y~p}[-log p(y)] =
  H(p)); with truncation it overstates it.  Free (no forward), on every backend.
* token entropy (trainer): at each completion position, the entropy of the full next-token distribution at the
  training temperature, ``H_t = -sum_v p_v log p_v`` with ``p = softmax(z / T)`` (``0 log 0 = 0``), before
  top-k/top-p like the stored log-probs.  The scoring core computes it inside its own fp32 logits chunks
  (``score_segments(..., entropy_out=...)``, ``scoring.token_entropy_from_logp``), without gradient and at no
  extra LM-head pass, so no ``[N, V]`` fp32 tensor for the whole batch exists: the trainer's loss pass does that;
  :func:`token_entropy` is the same formula on a logits tensor (OPSD's chunked KL uses it).  The step's ``entropy_mean`` is the mean over valid
  (masked) tokens: :func:`train_entropy_mean` over ``train.parquet``'s per-optimizer-step rows.
* ``teacher_weight_entropy`` (SGSD): per rollout the entropy of its teacher weights ``H_r = -sum_k w_k log w_k``
  (nats; ``w`` renormalised to sum 1, ``0 log 0 = 0``; ``log K`` when uniform), averaged over rollouts.
"""

from __future__ import annotations

import math
import os
from typing import Iterable

import polars as pl
import torch
import torch.nn.functional as F

from stages.engine.errors import InputError
from stages.engine.tableio import check_finite
from stages.engine.scoring import token_entropy_from_logp
from stages.engine.verify import MAX_ANSWER_CHARS, _last_boxed

Where = str | os.PathLike | None


# ---- token entropy -------------------------------------------------------------------------------------------

def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy (nats) of ``softmax(logits / temperature)`` over the last dim: ``[..., V] -> [...]`` in fp32.
    A ``-inf`` logit (a token the model cannot emit) contributes 0."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return token_entropy_from_logp(F.log_softmax(z, dim=-1))


def masked_sum_count(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(sum of ``values`` where ``mask``, number of such positions): what a micro-batch adds to a step's mean."""
    m = mask.to(torch.bool)
    return float(values.detach().float()[m].sum()), int(m.sum())


def train_entropy_mean(train: pl.DataFrame) -> float | None:
    """A loop step's token entropy from its ``train.parquet`` rows: the optimizer steps' ``entropy`` weighted by
    their ``mask_tokens`` (else ``tokens``); None without an ``entropy`` column or weight."""
    if "entropy" not in train.columns or train.height == 0:
        return None
    wcol = "mask_tokens" if "mask_tokens" in train.columns else "tokens" if "tokens" in train.columns else None
    e = train["entropy"].cast(pl.Float64).to_list()
    w = train[wcol].cast(pl.Float64).to_list() if wcol else [1.0] * len(e)
    pairs = [(x, y) for x, y in zip(e, w) if x is not None and y is not None and math.isfinite(x) and y > 0]
    tot = sum(y for _, y in pairs)
    return sum(x * y for x, y in pairs) / tot if tot > 0 else None


# ---- rollout-table metrics -----------------------------------------------------------------------------------

def has_boxed_answer(completion: str | None) -> bool:
    """The completion holds a boxed answer the grader would read (verify.py's extraction, length-capped)."""
    if not completion:
        return False
    ans = _last_boxed(completion)
    return ans is not None and len(ans) <= MAX_ANSWER_CHARS


def format_rate(completions: Iterable[str | None]) -> float:
    """Share of completions with a boxed answer (:func:`has_boxed_answer`); NaN for none."""
    flags = [has_boxed_answer(c) for c in completions]
    return sum(flags) / len(flags) if flags else float("nan")


def sampled_nll_mean(sample_logprobs: Iterable[list[float] | None]) -> float | None:
    """Token-weighted mean of ``-log p`` over the stored sampling log-probs (rows without them skipped)."""
    tot, n = 0.0, 0
    for lp in sample_logprobs:
        if lp is None:
            continue
        tot -= float(sum(lp))
        n += len(lp)
    return tot / n if n else None


def rollout_health(rollouts: pl.DataFrame, path: Where = None) -> dict[str, float | int]:
    """The rollout table's health columns of one loop step (metrics.parquet): completion_len_mean,
    completion_len_max, truncated_frac, and, when the columns exist, format_rate and sampled_nll_mean.
    ``path``: the table, for the one-line error on a non-finite sampling log-prob."""
    for col in ("completion_ids", "finish_reason"):
        if col not in rollouts.columns:
            raise InputError(path, f"missing column '{col}' (has: {', '.join(rollouts.columns) or 'none'})")
    if rollouts.height == 0:
        raise InputError(path, "no rollouts")
    lens = rollouts["completion_ids"].list.len()
    out: dict[str, float | int] = {"completion_len_mean": float(lens.mean()), "completion_len_max": int(lens.max()),
                                   "truncated_frac": float((rollouts["finish_reason"] == "length").mean())}
    if "completion" in rollouts.columns:
        out["format_rate"] = format_rate(rollouts["completion"].to_list())
    if "sample_logprobs" in rollouts.columns:
        check_finite(rollouts, ["sample_logprobs"], path, "rollout_id", nulls_ok=True)
        nll = sampled_nll_mean(rollouts["sample_logprobs"].to_list())
        if nll is not None:
            out["sampled_nll_mean"] = nll
    return out


# ---- teacher weights (SGSD) ----------------------------------------------------------------------------------

def weight_entropy(weights: Iterable[float]) -> float:
    """``-sum_k w_k log w_k`` (nats) of one rollout's teacher weights, renormalised to sum 1; ``0 log 0 = 0``."""
    w = [float(x) for x in weights]
    if not w or any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"teacher weights must be finite, >= 0 and not all 0, got {w}")
    s = sum(w)
    return -sum((x / s) * math.log(x / s) for x in w if x > 0)


def teacher_weight_entropy(score_teachers: pl.DataFrame, path: Where = None) -> float | None:
    """Mean over rollouts of :func:`weight_entropy` of their teachers' ``weight`` (score-teachers table, one row
    per (rollout, teacher)); None for an empty table.  A negative or non-finite weight: InputError."""
    for col in ("rollout_id", "weight"):
        if col not in score_teachers.columns:
            raise InputError(path, f"missing column '{col}' (has: {', '.join(score_teachers.columns) or 'none'})")
    if score_teachers.height == 0:
        return None
    check_finite(score_teachers, ["weight"], path, "rollout_id")
    neg = score_teachers.filter(pl.col("weight") < 0)
    if neg.height:
        raise InputError(path, f"column 'weight' holds a negative value in {neg.height} row(s) "
                               f"(first: rollout_id '{neg['rollout_id'][0]}')")
    per = score_teachers.group_by("rollout_id", maintain_order=True).agg(pl.col("weight"))
    ents = []
    for rid, ws in zip(per["rollout_id"].to_list(), per["weight"].to_list()):
        if sum(ws) <= 0:
            raise InputError(path, f"rollout_id '{rid}': its teacher weights are all 0")
        ents.append(weight_entropy(ws))
    return sum(ents) / len(ents)
