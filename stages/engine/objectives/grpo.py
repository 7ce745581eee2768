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

from pathlib import Path
from typing import Sequence

import polars as pl
import torch

from stages.engine.grading import grade_rollouts
from stages.engine.atomic import write_parquet
from stages.engine.errors import InputError
from stages.engine.tableio import check_finite, read_table
from stages.engine.dapo import overlong_token_mask
from stages.engine.objectives.base import (Data, Item, Objective, base_stats, entropy_sums, loss_mask, register,
                                           unique_temperature)
from stages.engine.tables import POLARIZE_ROLLOUTS, ROLLOUT, TRAIN_BATCH, TRAIN_OLD_LOGPROBS

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


# --------------------------------------------------------------------------------------------------
# the objective (docs/DESIGN.md 2, "Objectives")


@register
class GRPO(Objective):
    """GRPO baseline: rewards from the polarize grades, the rollout table's reward column or the verifier; group
    advantages; pi_old from the training model (computed once per table, cached) or the sampler.  A frozen copy
    of the initial weights is the KL reference under full fine-tuning when ``kl_beta > 0``."""
    name = "grpo"
    order = 2
    default_lora_dropout = 0.05  # peft / TRL default

    @classmethod
    def input_paths(cls, run_dir: Path) -> dict[str, Path]:
        if TRAIN_BATCH.file(run_dir).exists():  # the loop's dynamic sampling: the kept groups, each row with its reward
            return {"rollout": TRAIN_BATCH.file(run_dir)}
        paths = {"rollout": ROLLOUT.path(run_dir)}
        if POLARIZE_ROLLOUTS.file(run_dir).exists():
            paths["grades"] = POLARIZE_ROLLOUTS.file(run_dir)
        return paths

    @property
    def iterations(self) -> int:
        return self.cfg.num_iterations

    def needs_frozen_copy(self, lora: bool) -> bool:
        return not lora and self.cfg.kl_beta > 0

    def normaliser(self, items: list[Item]) -> float:
        if self.cfg.loss_agg == "sequence-mean":
            return float(len(items))
        return super().normaliser(items)

    def load(self, run_dir: Path, tok) -> Data:
        cfg = self.cfg
        paths = self.input_paths(run_dir)
        rt = read_table(paths["rollout"], {"rollout_id": str, "problem_id": str, "prompt_ids": list, "completion_ids": list})
        if "grades" in paths:
            gr = read_table(paths["grades"], {"rollout_id": str, "correct": bool})
            rewards = dict(zip(gr["rollout_id"].to_list(), [1.0 if c else 0.0 for c in gr["correct"].to_list()]))
            missing = [r for r in rt["rollout_id"].to_list() if r not in rewards]
            if missing:
                raise InputError(paths["grades"], f"{len(missing)} rollouts have no grade (first: '{missing[0]}')")
            source = POLARIZE_ROLLOUTS.name
        elif "reward" in rt.columns:
            check_finite(rt, ["reward"], paths["rollout"], "rollout_id")
            rewards = dict(zip(rt["rollout_id"].to_list(), [float(x) for x in rt["reward"].to_list()]))
            source = "rollout.reward"
        else:
            graded = grade_rollouts(read_table(paths["rollout"], {"rollout_id": str, "completion": str, "answer": str}),
                                    timeout_s=cfg.verify_timeout_s)
            rewards = dict(zip(graded["rollout_id"].to_list(), [1.0 if c else 0.0 for c in graded["correct"].to_list()]))
            source = "verifier"
        temp = unique_temperature(rt, "temperature", paths["rollout"], cfg.scoring_temperature, 1.0)
        finish = rt["finish_reason"].to_list() if "finish_reason" in rt.columns else ["stop"] * rt.height
        check_finite(rt, ["sample_logprobs"], paths["rollout"], "rollout_id", nulls_ok=True)  # null: recomputed
        slp = rt["sample_logprobs"].to_list() if "sample_logprobs" in rt.columns else [None] * rt.height
        items = []
        for r, fin, lp in zip(rt.select("rollout_id", "problem_id", "prompt_ids", "completion_ids").to_dicts(), finish, slp):
            n = len(r["completion_ids"])
            smp = [float(x) for x in lp] if lp is not None and len(lp) == n and n > 0 else None
            old = smp if cfg.old_logprobs == "sampler" else None
            items.append(Item(r["rollout_id"], r["problem_id"], tuple(r["prompt_ids"]), tuple(r["completion_ids"]),
                              overlong_token_mask([True] * n, fin, cfg.mask_truncated), correct=rewards[r["rollout_id"]] > 0, old_logprobs=old,
                              reward=rewards[r["rollout_id"]], sample_logprobs=smp))
        items.sort(key=lambda i: i.rid)
        adv = group_advantages(torch.tensor([i.reward for i in items]), [i.group for i in items], scale_std=cfg.scale_std)
        for it, a in zip(items, adv.tolist()):
            it.advantage = a
        sizes: dict[str, int] = {}
        for it in items:
            sizes[it.group] = sizes.get(it.group, 0) + 1
        vllm = "backend" in rt.columns and "vllm" in set(rt["backend"].drop_nulls().to_list())
        is_mode = cfg.is_correction or ("sequence-mask" if vllm and cfg.old_logprobs == "policy" else "none")
        info = {"rollouts": len(items), "reward_source": source, "group_sizes": sorted(set(sizes.values())),
                "old_logprobs": cfg.old_logprobs, "missing_sample_logprobs": sum(i.sample_logprobs is None for i in items),
                "is_correction": is_mode, "is_cap": cfg.is_cap if cfg.is_cap is not None else IS_CAP}
        return Data(items, paths, info, temp)

    def prepare(self, fw, run_dir: Path) -> None:
        """pi_old log-probs the backend did not return (or, by default, all of them): from the training model
        before its first update on the table, cached in ``train_old_logprobs.parquet``."""
        items = fw.data.items
        missing = [i for i, it in enumerate(items) if it.old_logprobs is None]
        if not missing:
            return
        cache = TRAIN_OLD_LOGPROBS.file(run_dir)
        if cache.exists():
            got = dict(zip(*pl.read_parquet(cache).select("rollout_id", "old_logprobs").to_dict(as_series=False).values()))
            if all(items[i].rid in got for i in missing):
                for i in missing:
                    items[i].old_logprobs = got[items[i].rid]
                return
        why = "pi_old from the training model" if self.cfg.old_logprobs == "policy" else "the backend did not return them"
        fw.log(f"computing pi_old log-probs of {len(missing)} rollouts ({why})")
        mb = self.cfg.micro_batch_size
        for s in range(0, len(missing), mb):
            idx = missing[s : s + mb]
            lp = fw.scoring_forward([items[i].segment for i in idx], fw.data.temperature)
            for i, p in zip(idx, torch.split(lp, [len(items[i].completion_ids) for i in idx])):
                items[i].old_logprobs = p.float().cpu().tolist()
        if fw.dist.main:
            write_parquet(pl.DataFrame({"rollout_id": [items[i].rid for i in missing],
                                        "old_logprobs": [items[i].old_logprobs for i in missing]}), cache)
        fw.dist.barrier()

    def loss(self, fw, items, weights, norm):
        cfg, T = self.cfg, fw.data.temperature
        segs = [it.segment for it in items]
        out = fw.student("logprobs", segs, T, entropy=cfg.log_entropy)
        lp, ent = out if cfg.log_entropy else (out, None)
        ref = fw.frozen("logprobs", segs, T, role="reference") if cfg.kl_beta > 0 else None
        lens = [len(it.completion_ids) for it in items]
        lp_parts = torch.split(lp, lens)
        ref_parts = torch.split(ref, lens) if ref is not None else [None] * len(items)
        sums, nvalid = [], []
        st = base_stats(items, weights)
        st.update(entropy_sums(ent, loss_mask(items, weights, lp.device)))
        st.update({"clipped": 0.0, "ratio": 0.0, "kl": 0.0, "reward": 0.0, "advantage_abs": 0.0})
        is_mode = fw.data.info.get("is_correction", "none")
        if is_mode != "none":
            st.update({"is_weight": 0.0, "is_capped": 0.0})
        for it, w, logp, ref_logp in zip(items, weights, lp_parts, ref_parts):
            old = torch.tensor(it.old_logprobs, dtype=torch.float32, device=logp.device)
            mask = torch.tensor(it.mask, device=logp.device)
            isw = None
            if is_mode != "none" and it.sample_logprobs is not None:
                cap = fw.data.info["is_cap"]
                isw = is_weights(old, torch.tensor(it.sample_logprobs, dtype=torch.float64), mask, is_mode, cap)
                if w > 0:
                    raw = is_weights(old, torch.tensor(it.sample_logprobs, dtype=torch.float64), mask, is_mode, float("inf"))
                    st["is_weight"] += float((isw * mask).sum())
                    st["is_capped"] += float(((isw != raw) * mask).sum())
            elif is_mode != "none" and w > 0:
                st["is_weight"] += float(mask.sum())  # no sampling log-probs stored: weight 1
            s, stats = sequence_loss(logp, old, it.advantage, mask, eps_low=cfg.clip_eps, eps_high=cfg.clip_eps_high,
                                     beta=cfg.kl_beta, ref_logp=ref_logp, is_weight=isw)
            sums.append(s * w)
            nvalid.append(int(mask.sum()))
            if w > 0:
                for k in ("clipped", "ratio", "kl"):
                    st[k] += stats[k]
                st["reward"] += it.reward
                st["advantage_abs"] += abs(it.advantage)
        loss = aggregate(sums, nvalid, cfg.loss_agg, norm)
        st["loss"] = float(loss.detach())
        return loss, st

    def metrics(self, sums):
        n = max(1.0, sums.get("rollouts", 0.0))
        mt = max(1.0, sums["mask_tokens"])
        row = {"reward": sums["reward"] / n, "clip_frac": sums["clipped"] / mt, "ratio_mean": sums["ratio"] / mt,
               "kl": sums["kl"] / mt, "advantage_abs": sums["advantage_abs"] / n}
        if "is_weight" in sums:  # importance-sampling correction: mean weight, share of tokens truncated / masked
            row.update({"is_weight_mean": sums["is_weight"] / mt, "is_capped_frac": sums["is_capped"] / mt})
        return row
