"""The SGSD formulas, each once.  docs/DESIGN.md 1.4.

Per rollout y, teacher k, completion token t:

* ``Delta_{k,t} = t_{k,t} - s_t`` (teacher minus student log-prob of the sampled token)
* mask ``m_t``: completion tokens minus special / ``<|...|>`` added tokens, think tags and 1-8 newline runs; ``N = max(1, sum m)``
* support ``a_k = (1/N) sum_t m_t clip(Delta_{k,t}, -3, 3)``
* stance ``sigma_k = sign(a_k)`` if ``|a_k| > 0.05`` else 0
* outcome ``o = +1`` if the verifier accepts y else -1; polarity ``rho_k = o * sigma_k``
* gated token loss ``l(D) = log 2 - softplus(-D^2 / (2 tau))`` (D unclipped, tau = 1)
* rollout loss ``L = sum_k w_k rho_k (1/N) sum_t m_t g_{k,t} l(Delta_{k,t})``; batch loss = mean over rollouts.
  ``g = 1`` (the reference, ``reversed_tokens = "all"``).  VARIANT ``reversed_tokens = "stance"``: for a reversed
  teacher (``rho_k = -1``) ``g_{k,t} = 1[sign(Delta_{k,t}) = sigma_k]``, so the pushed-apart term acts only on the
  tokens where the teacher leans the way its stance says (docs/SKILL_WORLD.md, "over-suppression").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import polars as pl
import torch
import torch.nn.functional as F

from stages.engine.config import Checked, field_opt, opt
from stages.engine.errors import InputError
from stages.engine.tableio import check_finite, read_table
from stages.engine.objectives.base import (Data, Item, Objective, TeacherTarget, base_stats, check_len, entropy_sums,
                                           loss_mask, register,
                                           unique_temperature)
from stages.engine.scoring import Segment
from stages.engine.tables import POLARIZE, ROLLOUT, SCORE_TEACHERS

CLIP = 3.0
STANCE_THRESHOLD = 0.05
TAU = 1.0
LOG2 = math.log(2.0)
POLARITIES = ("verifier", "imitate")


@dataclass(frozen=True)
class SGSDMethod(Checked):
    """The method's parameters, declared once (docs/DESIGN.md 1.2-1.4).  Each stage exposes the ones it uses as its
    own options (:func:`method_field`: same default, help and range) and passes :func:`method_of` its config."""
    k: int = opt(8, "Skills and mistakes retrieved per rollout (the top k of each); teacher j pairs the j-th skill with the j-th mistake, so a rollout gets K = min(k, bank skills, bank mistakes) teachers.", ge=1)
    weight_temperature: float = opt(1.0, "Softmax temperature of the teacher weights.", gt=0)
    clip: float = opt(CLIP, "Clip of Delta in the support score.", gt=0)
    stance_threshold: float = opt(STANCE_THRESHOLD, "|a_k| above which a teacher takes a stance.", ge=0)
    tau: float = opt(TAU, "SGSD gate temperature tau.", gt=0)
    polarity: str = opt("verifier", "verifier (rho = outcome x stance, the method) or imitate (ABLATION: rho forced to +1 for every teacher, i.e. imitate every skill-conditioned teacher whatever the verifier says).", choices=POLARITIES)


def method_field(name: str, *, group: str) -> Any:
    """A stage config's field for the method parameter ``name``: SGSDMethod's default, help and range."""
    f = {f.name: f for f in dataclasses.fields(SGSDMethod)}[name]
    o = field_opt(f)
    return opt(f.default, o["help"], group=group, choices=o["choices"], ge=o["ge"], gt=o["gt"], le=o["le"], lt=o["lt"])


def method_of(cfg: Any) -> SGSDMethod:
    """The method parameters a stage config carries (the others at their defaults)."""
    return SGSDMethod(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(SGSDMethod) if hasattr(cfg, f.name)})

THINK_TAGS = ("<think>", "</think>")
# polarity cells (docs/DESIGN.md 1.4): (outcome, stance) -> category
CATEGORIES = ("helpful", "warning", "misleading", "over_suppressive", "neutral")


def maskable_token_ids(tokenizer) -> tuple[set[int], set[int]]:
    """(special ids, newline ids) of a tokenizer: the tokens that m_t excludes, as the reference builds them
    (walawalagoose/SGSD skill/sgsd_trainer.py:557-582):

    * every id of ``all_special_ids``;
    * every added token (``get_added_vocab``) that is a think tag or has the form ``<|...|>``, special or not
      (Qwen3 adds ``<|box_start|>``, ``<|fim_prefix|>``, ... as non-special added tokens);
    * ``<think>``, ``</think>``, ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>`` when each encodes to one id;
    * newline runs ``"\\n" * r`` for r = 1..8 that encode to one id (not other whitespace tokens).
    """
    special = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None)
    added = getattr(tokenizer, "get_added_vocab", lambda: {})() or {}
    for text, idx in added.items():
        if text in THINK_TAGS or (text.startswith("<|") and text.endswith("|>")):
            special.add(int(idx))
    for text in (*THINK_TAGS, "<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1:
            special.add(int(ids[0]))
    newline: set[int] = set()
    for r in range(1, 9):
        ids = tokenizer.encode("\n" * r, add_special_tokens=False)
        if len(ids) == 1:
            newline.add(int(ids[0]))
    return special, newline


def token_mask(token_ids: Sequence[int], special_ids: Iterable[int], newline_ids: Iterable[int]) -> list[bool]:
    """m_t for each completion token: False for special tokens, think tags and newline-only tokens."""
    excluded = set(special_ids) | set(newline_ids)
    return [int(t) not in excluded for t in token_ids]


def delta(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """Delta_{k,t} = t_{k,t} - s_t: the teacher's log-prob of the student's token minus the student's."""
    return teacher_logprobs - student_logprobs


def clipped_fraction(delta: torch.Tensor, mask: torch.Tensor, clip: float = CLIP) -> torch.Tensor:
    """Share of the N masked tokens whose |Delta| exceeds the clip (where support saturates).  Works on [..., T]."""
    m = mask.to(torch.bool)
    n = m.sum(-1).clamp(min=1).to(delta.dtype)
    return ((delta.abs() > clip) & m).sum(-1).to(delta.dtype) / n


def support_score(delta: torch.Tensor, mask: torch.Tensor, clip: float = CLIP) -> torch.Tensor:
    """a = (1/N) sum_t m_t clip(Delta_t, -clip, clip), N = max(1, sum m).  Works on [..., T]."""
    m = mask.to(delta.dtype)
    n = m.sum(-1).clamp(min=1.0)
    return (delta.clamp(-clip, clip) * m).sum(-1) / n


def stance(a: torch.Tensor | float, threshold: float = STANCE_THRESHOLD):
    """sigma = sign(a) if |a| > threshold else 0."""
    if isinstance(a, torch.Tensor):
        return torch.where(a.abs() > threshold, torch.sign(a), torch.zeros_like(a)).to(torch.int64)
    return (1 if a > 0 else -1) if abs(a) > threshold else 0


def polarity(outcome: int, sigma: int) -> int:
    """rho = o * sigma with o = +1 (verified correct) / -1."""
    if outcome not in (1, -1):
        raise ValueError("outcome must be +1 or -1")
    return outcome * sigma


def category(outcome: int, sigma: int) -> str:
    """The four polarity cells plus neutral."""
    if sigma == 0:
        return "neutral"
    if outcome == 1:
        return "helpful" if sigma == 1 else "over_suppressive"
    return "warning" if sigma == -1 else "misleading"


def gated_loss(delta: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """l(D) = log 2 - softplus(-D^2 / (2 tau)): 0 at D = 0, saturates at log 2."""
    return LOG2 - F.softplus(-(delta * delta) / (2.0 * tau))


REVERSED_TOKENS = ("all", "stance")


def rollout_loss(
    student: torch.Tensor,
    teachers: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    rho: torch.Tensor,
    tau: float = TAU,
    sigma: torch.Tensor | None = None,
    reversed_tokens: str = "all",
) -> torch.Tensor:
    """L = sum_k w_k rho_k (1/N) sum_t m_t g_{k,t} l(t_{k,t} - s_t)  (module docstring; N counts m_t only).

    student [T] (with grad), teachers [K, T] (no grad), mask [T] bool, weights [K], rho [K]; ``sigma`` [K]
    (the stances) is needed for ``reversed_tokens = "stance"``.
    """
    delta = teachers.detach() - student.unsqueeze(0)
    m = mask.to(student.dtype)
    n = m.sum().clamp(min=1.0)
    g = torch.ones_like(delta)
    if reversed_tokens == "stance":
        if sigma is None:
            raise ValueError("reversed_tokens='stance' needs the teachers' stances (sigma)")
        agrees = (torch.sign(delta.detach()) == sigma.to(delta.dtype).unsqueeze(-1)).to(delta.dtype)
        g = torch.where((rho < 0).unsqueeze(-1), agrees, g)
    elif reversed_tokens != "all":
        raise ValueError(f"reversed_tokens must be one of {REVERSED_TOKENS}, got {reversed_tokens!r}")
    per_teacher = (gated_loss(delta, tau) * g * m).sum(-1) / n
    return (weights.to(student.dtype) * rho.to(student.dtype) * per_teacher).sum()


def teacher_weights(pair_scores: Sequence[float], temperature: float = 1.0) -> list[float]:
    """w_j = softmax_j(mean pair similarity / temperature).  docs/DESIGN.md 1.2."""
    if not pair_scores:
        return []
    z = [s / temperature for s in pair_scores]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    tot = sum(e)
    return [v / tot for v in e]


# --------------------------------------------------------------------------------------------------
# the objective (docs/DESIGN.md 2, "Objectives")


@register
class SGSD(Objective):
    """Gated skill-conditioned self-distillation: reads rollout + score_teachers + polarize; the teachers are
    live (current weights, no grad), fixed (the stored score-teachers log-probs: no frozen copy) or EMA."""
    name = "sgsd"
    order = 0

    def __init__(self, cfg):
        super().__init__(cfg)
        self.method = method_of(cfg)

    @classmethod
    def input_paths(cls, run_dir: Path) -> dict[str, Path]:
        return {"rollout": ROLLOUT.path(run_dir), "score_teachers": SCORE_TEACHERS.path(run_dir),
                "polarize": POLARIZE.path(run_dir)}

    def load(self, run_dir: Path, tok) -> Data:
        cfg = self.cfg
        paths = self.input_paths(run_dir)
        rt = read_table(paths["rollout"], {"rollout_id": str, "problem_id": str, "prompt_ids": list, "completion_ids": list})
        st = read_table(paths["score_teachers"], {"rollout_id": str, "teacher_rank": int, "teacher_prompt_ids": list,
                                                 "teacher_logprobs": list})
        pt = read_table(paths["polarize"], {"rollout_id": str, "teacher_rank": int, "weight": float, "polarity": int,
                                           "token_mask": list})
        check_finite(pt, ["weight", "support"], paths["polarize"], "rollout_id")
        if cfg.teacher_mode == "fixed":  # the stored log-probs are the teacher itself
            check_finite(st, ["teacher_logprobs"], paths["score_teachers"], "rollout_id")
        extra = [c for c in ("category", "support", "stance", "correct") if c in pt.columns]
        joined = pt.select("rollout_id", "teacher_rank", "weight", "polarity", "token_mask", *extra).join(
            st.select("rollout_id", "teacher_rank", "teacher_prompt_ids", "teacher_logprobs"),
            on=["rollout_id", "teacher_rank"], how="left")
        missing = joined.filter(pl.col("teacher_prompt_ids").is_null())
        if missing.height:
            r = missing.row(0, named=True)
            raise InputError(paths["score_teachers"], f"{missing.height} polarize rows have no score-teachers row "
                                                      f"(first: rollout '{r['rollout_id']}' teacher {r['teacher_rank']})")
        per = {r["rollout_id"]: r for r in rt.select("rollout_id", "problem_id", "prompt_ids", "completion_ids").to_dicts()}
        items: dict[str, Item] = {}
        for r in joined.sort(["rollout_id", "teacher_rank"]).to_dicts():
            rid = r["rollout_id"]
            if rid not in per:
                raise InputError(paths["polarize"], f"rollout '{rid}' is not in the rollout table {paths['rollout']}")
            if rid not in items:
                ro = per[rid]
                n = len(ro["completion_ids"])
                check_len(paths["polarize"], rid, "token_mask", len(r["token_mask"]), n)
                items[rid] = Item(rid, ro["problem_id"], tuple(ro["prompt_ids"]), tuple(ro["completion_ids"]),
                                  [bool(x) for x in r["token_mask"]], correct=r.get("correct"))
            it = items[rid]
            check_len(paths["score_teachers"], rid, "teacher_logprobs", len(r["teacher_logprobs"]), len(it.completion_ids))
            support = float(r.get("support") or 0.0)
            sigma = r.get("stance")  # the stance polarize gave the teacher (older tables: from its support)
            it.teachers.append(TeacherTarget(tuple(r["teacher_prompt_ids"]), r["teacher_logprobs"], float(r["weight"]),
                                             int(r["polarity"]), r.get("category") or "neutral", support,
                                             int(sigma) if sigma is not None else stance(support, self.method.stance_threshold)))
        bank = sorted(set(st["bank_version"].drop_nulls().to_list())) if "bank_version" in st.columns else []
        temp = unique_temperature(st, "scoring_temperature", paths["score_teachers"], cfg.scoring_temperature, 1.0)
        info = {"bank_version": ",".join(bank) if bank else None, "rollouts": len(items),
                "teachers_per_rollout": max((len(i.teachers) for i in items.values()), default=0)}
        return Data(sorted(items.values(), key=lambda i: i.rid), paths, info, temp)

    def normaliser(self, items: list[Item]) -> float:
        return float(len(items))  # batch loss = mean over rollouts

    def _rho(self, t: TeacherTarget) -> int:
        """The teacher's polarity: the verifier's (polarize table), or +1 under the imitate ablation."""
        return 1 if self.method.polarity == "imitate" else t.rho

    def loss(self, fw, items, weights, norm):
        cfg, T = self.cfg, fw.data.temperature
        out = fw.student("logprobs", [it.segment for it in items], T, entropy=cfg.log_entropy)
        s_all, ent = out if cfg.log_entropy else (out, None)
        s_parts = torch.split(s_all, [len(it.completion_ids) for it in items])
        if cfg.teacher_mode == "fixed":
            t_rows = [[torch.tensor(t.logprobs, dtype=torch.float32, device=s_all.device) for t in it.teachers] for it in items]
        else:  # recompute, skipping neutral teachers (rho = 0 adds nothing)
            active = [(i, k) for i, it in enumerate(items) for k, t in enumerate(it.teachers) if self._rho(t) != 0 and weights[i] > 0]
            segs = [Segment.of(items[i].teachers[k].prompt_ids, items[i].completion_ids) for i, k in active]
            if not segs and fw.mode == "fsdp":
                segs = [items[0].segment]  # every rank must run the same number of forwards
            lp = fw.frozen("logprobs", segs, T) if segs else s_all.new_zeros(0)
            parts = torch.split(lp, [len(s.completion_ids) for s in segs]) if segs else []
            t_rows = [[s_all.new_zeros(len(it.completion_ids)) for _ in it.teachers] for it in items]
            for (i, k), p in zip(active, parts):
                t_rows[i][k] = p.float()
        loss = s_all.new_zeros(())
        st = base_stats(items, weights)
        st.update(entropy_sums(ent, loss_mask(items, weights, s_all.device)))
        st.update({f"n_{c}": 0 for c in CATEGORIES})
        st.update({"teachers": 0, "support": 0.0, "abs_delta": 0.0, "delta_tokens": 0})
        for it, w, s, trow in zip(items, weights, s_parts, t_rows):
            if not it.teachers:
                continue
            teachers = torch.stack(trow)
            mask = torch.tensor(it.mask, device=s.device)
            wk = torch.tensor([t.weight for t in it.teachers], device=s.device)
            rho = torch.tensor([self._rho(t) for t in it.teachers], device=s.device)
            sigma = torch.tensor([t.stance for t in it.teachers], device=s.device)
            loss = loss + w * rollout_loss(s, teachers, mask, wk, rho, tau=self.method.tau, sigma=sigma,
                                           reversed_tokens=cfg.reversed_tokens)
            if w > 0:
                live = rho != 0
                d = (teachers - s.detach())[live][:, mask] if bool(live.any()) else s.new_zeros(0)
                st["abs_delta"] += float(d.abs().sum())
                st["delta_tokens"] += int(d.numel())
                st["teachers"] += len(it.teachers)
                st["support"] += sum(t.support for t in it.teachers)
                for t in it.teachers:
                    if t.category in CATEGORIES:
                        st[f"n_{t.category}"] += 1
        st["loss"] = float(loss.detach()) / norm
        return loss / norm, st

    def metrics(self, sums):
        nt = max(1.0, sums["teachers"])
        row = {f"frac_{c}": sums[f"n_{c}"] / nt for c in CATEGORIES}
        row["mean_support"] = sums["support"] / nt
        row["mean_abs_delta"] = sums["abs_delta"] / max(1.0, sums["delta_tokens"])
        return row
