"""The OPSD baseline's loss: clipped full-vocabulary forward KL(teacher || student) per token.  docs/DESIGN.md 1.5.

Per completion token t (student prompt vs teacher prompt that carries the gold answer)::

    kl_t = sum_v min(p_T(v) (log p_T(v) - log p_S(v)), clip)        clip = 0.05

each vocabulary term is clipped *before* the sum; the rollout loss is the mean of ``kl_t`` over valid
tokens.  Logits are divided by the training temperature first (the rollout's sampling temperature, 1.1 in
the reference recipe: opsd_trainer.py:455-457, scripts/run_opsd.sh:49).  ``top_k > 0`` is the top-k variant:
teacher and student are both renormalised over the teacher's k most likely tokens (opsd_trainer.py:459-468).

:func:`chunked_clipped_forward_kl` computes the same numbers from hidden states, ``chunk`` positions at a
time: each chunk's teacher and student ``[chunk, vocab]`` fp32 logits live only inside the chunk (the
student chunk is recomputed in backward), so two ``[tokens, vocab]`` fp32 tensors for a whole batch never
exist at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from stages.engine.tableio import read_table
from stages.engine.dapo import overlong_token_mask
from stages.engine.health import token_entropy
from stages.engine.objectives.base import Data, Item, Objective, base_stats, entropy_sums, register, unique_temperature
from stages.engine.prompts import chat_prompt_ids, opsd_teacher_prompt, teacher_thinking_flag
from stages.engine.scoring import Segment, head_logits_fp32, pack, pack_batches, split_lm

KL_CLIP = 0.05


def clipped_forward_kl(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, *, clip: float = KL_CLIP, top_k: int = 0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position clipped forward KL from ``[N, V]`` logits (teacher without grad).  ``clip <= 0``: no clip."""
    tl = teacher_logits.detach().float() / temperature
    sl = student_logits.float() / temperature
    if top_k and top_k > 0:  # both distributions renormalised over the teacher's top k (opsd_trainer.py:459-468)
        idx = torch.topk(tl, min(top_k, tl.shape[-1]), dim=-1).indices
        tl, sl = tl.gather(-1, idx), sl.gather(-1, idx)
    t = F.log_softmax(tl, dim=-1)
    s = F.log_softmax(sl, dim=-1)
    terms = t.exp() * (t - s)
    if clip and clip > 0:
        terms = terms.clamp(max=clip)
    return terms.sum(-1)


def _chunk_kl(student_head, teacher_head, sh, th, clip, top_k, temperature, entropy: list | None = None):
    """One chunk's clipped KL.  ``entropy``: an empty list receives the student's token entropy from the same
    logits chunk (no grad; skipped when filled, i.e. in the checkpoint's recomputation)."""
    with torch.no_grad():
        t_logits = head_logits_fp32(teacher_head, th)  # fp32 LM head even under bf16 autocast
    s_logits = head_logits_fp32(student_head, sh)
    if entropy is not None and not entropy:
        entropy.append(token_entropy(s_logits.detach(), temperature))
    return clipped_forward_kl(t_logits, s_logits, clip=clip, top_k=top_k, temperature=temperature)


def chunked_clipped_forward_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_head: torch.nn.Module | None = None,
    *,
    clip: float = KL_CLIP,
    top_k: int = 0,
    temperature: float = 1.0,
    chunk: int = 1024,
    entropy_out: list | None = None,
) -> torch.Tensor:
    """:func:`clipped_forward_kl` of ``head(hidden)`` for ``[N, H]`` hidden states, ``chunk`` rows at a time.
    ``entropy_out``: a list that receives the student's ``[N]`` token entropies (health.token_entropy at
    ``temperature``), from the same student logits chunks."""
    teacher_head = student_head if teacher_head is None else teacher_head
    teacher_hidden = teacher_hidden.detach()
    needs_grad = torch.is_grad_enabled() and (
        student_hidden.requires_grad or any(p.requires_grad for p in student_head.parameters()))
    outs, ents = [], []
    for s in range(0, student_hidden.shape[0], chunk):
        holder: list | None = [] if entropy_out is not None else None
        args = (student_head, teacher_head, student_hidden[s : s + chunk], teacher_hidden[s : s + chunk],
                clip, top_k, temperature, holder)
        outs.append(checkpoint(_chunk_kl, *args, use_reentrant=False) if needs_grad else _chunk_kl(*args))
        if holder:
            ents.append(holder[0])
    if entropy_out is not None:
        entropy_out.append(torch.cat(ents) if ents else student_hidden.new_zeros(0, dtype=torch.float32))
    return torch.cat(outs) if outs else student_hidden.new_zeros(0, dtype=torch.float32)


def completion_hidden(model, segments: Sequence[Segment], *, token_budget: int | None = None) -> torch.Tensor:
    """Final hidden states ``[sum_i len(completion_i), H]`` at the positions that predict each completion token.

    Sequences are packed (position ids restart per sequence, no padding) like the scoring core does;
    ``token_budget=None`` packs everything into one forward (what FSDP needs: the same number of forwards
    on every rank).  Rows come back in input order.
    """
    body, head = split_lm(model)
    device = head.weight.device
    lengths = [len(s) for s in segments]
    batches = [list(range(len(segments)))] if token_budget is None else pack_batches(lengths, token_budget)
    pieces: dict[int, torch.Tensor] = {}
    for batch in batches:
        pk = pack([segments[i] for i in batch], batch)
        hidden = body(input_ids=torch.tensor([pk.ids], device=device), position_ids=torch.tensor([pk.pos], device=device),
                      attention_mask=None, use_cache=False).last_hidden_state[0]
        hsel = hidden.index_select(0, torch.tensor(pk.sel, device=device, dtype=torch.long))
        start = 0
        for i, c in pk.spans:
            pieces[i] = hsel[start : start + c]
            start += c
    return torch.cat([pieces[i] for i in range(len(segments))]) if segments else torch.zeros(0)


# --------------------------------------------------------------------------------------------------
# the objective (docs/DESIGN.md 2, "Objectives")


@register
class OPSD(Objective):
    """On-policy self-distillation baseline: the teacher prompt carries the gold answer; the teacher is the initial
    weights by default (a frozen copy under full fine-tuning, the adapter switched off under LoRA)."""
    name = "opsd"
    order = 1
    default_teacher_mode = "fixed"

    def needs_frozen_copy(self, lora: bool) -> bool:
        return not lora and self.cfg.teacher_mode == "fixed"

    def load(self, run_dir: Path, tok) -> Data:
        cfg = self.cfg
        paths = self.input_paths(run_dir)
        rt = read_table(paths["rollout"], {"rollout_id": str, "problem_id": str, "problem": str, "answer": str,
                                           "prompt_ids": list, "completion_ids": list})
        own = rt["thinking"].to_list() if "thinking" in rt.columns else [False] * rt.height
        thinking = [teacher_thinking_flag(cfg.teacher_thinking, bool(x)) for x in own]
        finish = rt["finish_reason"].to_list() if "finish_reason" in rt.columns else ["stop"] * rt.height
        cache: dict[tuple[str, str, bool], tuple[int, ...]] = {}
        items = []
        for r, th, fin in zip(rt.select("rollout_id", "problem_id", "problem", "answer", "prompt_ids",
                                        "completion_ids").to_dicts(), thinking, finish):
            key = (r["problem"], r["answer"], bool(th))
            if key not in cache:
                cache[key] = tuple(chat_prompt_ids(tok, opsd_teacher_prompt(r["problem"], r["answer"]), bool(th)))
            n = len(r["completion_ids"])
            items.append(Item(r["rollout_id"], r["problem_id"], tuple(r["prompt_ids"]), tuple(r["completion_ids"]),
                              overlong_token_mask([True] * n, fin, cfg.mask_truncated), teacher_prompt_ids=cache[key]))
        # the reference divides both logits by the training (sampling) temperature: opsd_trainer.py:455-457
        temp = unique_temperature(rt, "temperature", paths["rollout"], cfg.scoring_temperature, 1.0)
        info = {"rollouts": len(items), "teacher_thinking": cfg.teacher_thinking}
        return Data(sorted(items, key=lambda i: i.rid), paths, info, temp)

    def loss(self, fw, items, weights, norm):
        cfg, T = self.cfg, fw.data.temperature
        th = fw.frozen("hidden", [Segment.of(it.teacher_prompt_ids, it.completion_ids) for it in items], T)
        out = fw.student("opsd", [it.segment for it in items], T, teacher_hidden=th, teacher_head=fw.teacher_head(),
                         kl={"clip": cfg.kl_clip, "top_k": cfg.kl_top_k, "chunk": cfg.kl_chunk}, entropy=cfg.log_entropy)
        kl, ent = out if cfg.log_entropy else (out, None)
        m = torch.tensor([float(b) * w for it, w in zip(items, weights) for b in it.mask], device=kl.device)
        total = (kl * m).sum()
        st = base_stats(items, weights)
        st.update(entropy_sums(ent, m))
        st["loss"] = float(total.detach()) / norm
        st["kl_sum"] = float(total.detach())
        return total / norm, st

    def metrics(self, sums):
        return {"kl_per_token": sums["kl_sum"] / max(1.0, sums["mask_tokens"])}
