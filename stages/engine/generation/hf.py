"""The plain transformers decode loop (``--backend hf``)."""

from __future__ import annotations


from typing import Callable

import torch




from stages.engine.generation.base import Completion, GenerationBackend, SamplingConfig, cache_argument, job_key, sample_tokens


class HFBackend(GenerationBackend):
    """transformers decode loop: left-padded batches, KV cache, on-device batch-invariant sampling (the hf-fast
    engine's Gumbel-max noise, so both draw the same tokens from the same logits), per-sequence EOS."""

    name = "hf"

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_ids = sorted(set(int(e) for e in eos_ids))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self.cache_arg = cache_argument(model)

    def update_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def _decode_batch(self, prompts: list[list[int]], cfg: SamplingConfig, keys: list[int],
                      on_done: Callable[[int], None] | None = None):
        """Decode one left-padded batch; ``keys``: each sequence's sampling key (:func:`job_key`);
        ``on_done(k)`` as k sequences of it finish (per-sequence progress)."""
        model = self.model
        device = next(model.parameters()).device
        B = len(prompts)
        L = max(len(p) for p in prompts)
        ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, L - len(p) :] = torch.tensor(p)
            attn[b, L - len(p) :] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        stop = torch.tensor(self.eos_ids + list(cfg.stop_token_ids), device=device)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        past = getattr(out, self.cache_arg)
        logits = out.logits[:, -1]
        next_pos = pos[:, -1] + 1
        toks = torch.empty((B, 0), dtype=torch.long, device=device)
        lps = torch.empty((B, 0), dtype=torch.float32, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        key_t = torch.tensor(keys, dtype=torch.long, device=device)
        top_k = int(cfg.top_k) if cfg.top_k and cfg.top_k > 0 else 0
        for step in range(cfg.max_new_tokens):
            tok, lp = sample_tokens(logits, greedy=cfg.greedy(), top_k=top_k, use_top_p=cfg.top_p < 1.0,
                                    temperature=cfg.temperature, top_p=cfg.top_p, keys=key_t,
                                    steps=torch.full_like(key_t, step))
            tok = torch.where(done, torch.full_like(tok, self.pad_id), tok)
            toks = torch.cat([toks, tok[:, None]], 1)
            lps = torch.cat([lps, lp[:, None]], 1)
            is_stop = torch.isin(tok, stop) & ~done
            stopped |= is_stop
            done |= is_stop
            if on_done is not None and bool(is_stop.any()):
                on_done(int(is_stop.sum()))
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
            out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                        use_cache=True, **{self.cache_arg: past})
            past = getattr(out, self.cache_arg)
            logits = out.logits[:, -1]
            next_pos = next_pos + 1
        toks, lps, stopped = toks.cpu(), lps.cpu(), stopped.cpu()
        if on_done is not None and not bool(stopped.all()):
            on_done(int((~stopped).sum()))  # the ones cut at max_new_tokens
        res = []
        for b in range(B):
            row = toks[b].tolist()
            n = len(row)
            if stopped[b]:
                n = next(i for i, t in enumerate(row) if t in self.eos_ids or t in cfg.stop_token_ids) + 1
            res.append((row[:n], lps[b, :n].tolist(), "stop" if stopped[b] else "length"))
        return res

    def generate(self, prompts, cfg, on_done=None):
        jobs = [(pi, si) for pi in range(len(prompts)) for si in range(cfg.n)]
        # sort by prompt length so a batch wastes little padding
        jobs.sort(key=lambda j: -len(prompts[j[0]]))
        results: dict[tuple[int, int], Completion] = {}
        for s in range(0, len(jobs), cfg.batch_size):
            chunk = jobs[s : s + cfg.batch_size]
            keys = [job_key(cfg.seed, cfg.prompt_key(pi), si) for pi, si in chunk]
            outs = self._decode_batch([list(prompts[pi]) for pi, _ in chunk], cfg, keys, on_done)
            for (pi, si), (toks, lps, fin) in zip(chunk, outs):
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                results[(pi, si)] = Completion(pi, si, toks, lps, fin, text)
        return [results[k] for k in sorted(results)]
