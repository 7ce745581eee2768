"""The GRPO baseline's formulas, each once.  docs/DESIGN.md 1.5.

* group-normalised advantage ``A_i = (r_i - mean_g r) / (std_g r + eps)`` over the G rollouts of one
  prompt (``scale_std=False``: ``r_i - mean_g r`` only).  ``std`` is the unbiased sample std, as TRL's
  GRPOTrainer computes it; a group of one rollout gets advantage 0.
* PPO clipped surrogate per token ``-min(ratio_t A, clip(ratio_t, 1 - eps_low, 1 + eps_high) A)`` with
  ``ratio_t = exp(log pi_theta(y_t) - log pi_old(y_t))`` (pi_old: by default the training model's log-probs
  before its first update on the table, as TRL computes them; optionally the rollout engine's sampling log-probs).
* optional KL to a reference policy with the k3 estimator ``exp(ref - new) - (ref - new) - 1``, weight beta.
* optional importance-sampling correction of the engine/trainer mismatch (TRL 0.26 GRPOTrainer, grpo_trainer.py
  1859-1884 and 2213-2214): with ``d_t = m_t (log pi_old(y_t) - log pi_sampler(y_t))`` (pi_old: the training
  model before the update, pi_sampler: the rollout engine's stored sampling log-probs), the ratio is
  ``r_t = exp(d_t)`` (``token-*`` modes) or one ``r = exp(sum_t d_t)`` for every token (``sequence-*``);
  ``*-truncate``: ``min(r, C)``, ``*-mask``: ``r`` if ``r <= C`` else 0.  The weight (no gradient) multiplies the
  clipped surrogate per token, before the KL term is added.  TRL 0.26's default, which the reference's GRPO run
  got (run_grpo.sh:42 --use_vllm): ``sequence-mask`` with C = 3.0.
* aggregation: ``sequence-mean`` (per-sequence token mean, then mean over sequences: TRL's ``loss_type=grpo``,
  the reference's scripts/run_grpo.sh:40) or ``token-mean`` (sum over every valid token of the batch / number
  of valid tokens).
"""

from __future__ import annotations

from typing import Sequence

import torch

AGGREGATIONS = ("token-mean", "sequence-mean")
IS_MODES = ("none", "token-truncate", "token-mask", "sequence-truncate", "sequence-mask")
IS_CAP = 3.0  # TRL 0.26 GRPOConfig.vllm_importance_sampling_cap (grpo_config.py:755-761)


def group_advantages(
    rewards: torch.Tensor, group_ids: Sequence, *, scale_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Per-rollout advantages; rollouts with the same group id (the same prompt) form one group."""
    rewards = rewards.to(torch.float64)
    adv = torch.zeros_like(rewards)
    groups: dict = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(g, []).append(i)
    for idx in groups.values():
        r = rewards[idx]
        if len(idx) < 2:
            continue  # no baseline from a group of one
        centred = r - r.mean()
        if scale_std:
            centred = centred / (r.std(unbiased=True) + eps)
        adv[idx] = centred
    return adv.to(torch.float32)


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantage: torch.Tensor | float,
    eps_low: float = 0.2, eps_high: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss, per-token bool 'the clipped branch was taken')."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * advantage
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantage
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(ref - new) - (ref - new) - 1 (>= 0)."""
    d = ref_logp.detach() - logp
    return torch.exp(d) - d - 1.0


def is_weights(old_logp: torch.Tensor, sample_logp: torch.Tensor, mask: torch.Tensor, mode: str,
               cap: float = IS_CAP) -> torch.Tensor:
    """Per-token importance-sampling weights [T] of one completion (see the module docstring); ``none``: ones."""
    if mode not in IS_MODES:
        raise ValueError(f"importance-sampling mode must be one of {IS_MODES}, got {mode!r}")
    if mode == "none":
        return torch.ones_like(old_logp, dtype=torch.float32)
    d = (old_logp.detach().double() - sample_logp.detach().double().to(old_logp.device)) * mask.double()
    r = torch.exp(d.sum()).expand_as(d) if mode.startswith("sequence") else torch.exp(d)
    r = torch.clamp(r, max=cap) if mode.endswith("truncate") else r.masked_fill(r > cap, 0.0)
    return r.float()


def sequence_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantage: float, mask: torch.Tensor, *,
    eps_low: float = 0.2, eps_high: float | None = None, beta: float = 0.0, ref_logp: torch.Tensor | None = None,
    is_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked per-token loss of one completion, summed over tokens (not yet normalised), and its stats;
    ``is_weight``: per-token importance-sampling weights (:func:`is_weights`) on the surrogate."""
    per_tok, was_clipped = clipped_surrogate(logp, old_logp, advantage, eps_low, eps_high)
    if is_weight is not None:
        per_tok = per_tok * is_weight.to(per_tok.dtype)
    kl = None
    if beta and ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_tok = per_tok + beta * kl
    m = mask.to(per_tok.dtype)
    stats = {
        "clipped": float((was_clipped.to(m.dtype) * m).sum()),
        "ratio": float((torch.exp(logp.detach() - old_logp) * m).sum()),
        "kl": float((kl.detach() * m).sum()) if kl is not None else 0.0,
    }
    return (per_tok * m).sum(), stats


def aggregate(token_sums: Sequence[torch.Tensor], n_valid: Sequence[int], mode: str, normaliser: float) -> torch.Tensor:
    """Combine per-sequence masked token sums.

    ``token-mean``: sum(token_sums) / normaliser (the batch's valid-token count);
    ``sequence-mean``: sum(token_sums_i / max(1, n_valid_i)) / normaliser (the batch's sequence count).
    The normaliser is passed in so that micro-batches and ranks each add their share of one batch mean.
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {mode!r}")
    if not token_sums:
        return torch.zeros(())
    if mode == "token-mean":
        total = torch.stack(list(token_sums)).sum()
    else:
        total = torch.stack([s / max(1, n) for s, n in zip(token_sums, n_valid)]).sum()
    return total / max(normaliser, 1e-12)
