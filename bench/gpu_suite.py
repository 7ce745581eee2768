"""One-call speed suite for the scoring core, the SGSD teacher step, a training step and generation.

    python bench/gpu_suite.py --device cuda                 # Qwen3-1.7B-shaped random model, bf16
    python bench/gpu_suite.py --device cpu --shape tiny     # everything small, on CPU, for anyone

Sections (each measured after a warm-up call, on the same random inputs for both ways):

(a) scoring: log-probs of given tokens for rollouts of realistic lengths (prompts U(100, 600), completions
    U(200, 1024) tokens): ``stages.engine.scoring.score_naive`` (right-padded batch, full fp32 logits) vs
    ``stages.engine.scoring.score_segments`` (packed, chunked LM head).
(b) one SGSD scoring step with K=8 teachers per rollout: the reference layout (per rollout, K right-padded
    teacher rows + K copies of the student row, full logits) vs ours (one student segment + K teacher
    segments, all rollouts packed into ``score_segments`` micro-batches).
(c) a full fine-tuning step (AdamW) with gradient checkpointing: naive padded full-logits loss vs ours
    (packed, ``score_segments(..., grad=True)``: chunked log-probs with gradients).
(d) generation with sampling (T 1.1, top-p 0.95, top-k 20) and variable-length stops (a random stop set
    of ~2V/max_new tokens, so lengths are roughly geometric with mean ~max_new/2): ``model.generate``
    with a static cache (transformers compiles its decode step on CUDA; prompts left-padded to one length
    and one StaticCache per batch size so it compiles once) vs ``FastHFBackend`` (continuous batching),
    2 x batch prompts each, batch 64 and 256, 256 and 1024 new tokens.

Throughput counts real tokens only (no padding).  MFU = useful FLOPs / seconds / peak dense bf16 FLOP/s
(H100 SXM and H200: 989 TFLOP/s); useful forward FLOPs = 2 * P * tokens + causal attention
4 * layers * heads * head_dim * n(n+1)/2 per sequence of n tokens (P: matmul weights, LM head included,
embedding excluded); a training step counts 3x that (forward + backward; checkpointing's recompute is
not counted).  Peak memory: ``torch.cuda.max_memory_allocated`` above the level before the call; on CPU
the highest RSS above the starting RSS (sampling thread, allocations over 64 KiB mmapped so frees reach
the OS), a rough lower bound.

The suite writes its table into bench/RESULTS.md (a block per device/shape, with the card's name and the
date) and prints one JSON object with every figure as its last line.  It imports only torch,
transformers, stages.engine.scoring and (section d) stages.engine.generation.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import inspect
import json
import random
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

import score_bench as sb  # noqa: E402
from stages.engine.scoring import Segment, score_naive, score_segments  # noqa: E402

try:  # stages.engine.generation may reach polars (stages.engine.tableio); without polars only the FastHF / varlen ways are lost
    from stages.engine.scoring import score_segments_varlen, varlen_attention
    FAST_IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the machine
    score_segments_varlen = varlen_attention = None
    FAST_IMPORT_ERROR = f"{type(e).__name__}: {e}"

PROFILES = {
    "cuda": dict(score_n=16, prompt=(100, 600), completion=(200, 1024), rollouts=4, K=8, guidance=(150, 400),
                 train_n=8, gen=[(64, 256), (64, 1024), (256, 256), (256, 1024)], gen_prompt=(100, 600),
                 prompts_per_slot=2, repeats=3, token_budget=16384),
    "cpu": dict(score_n=8, prompt=(20, 120), completion=(40, 200), rollouts=2, K=8, guidance=(30, 80),
                train_n=4, gen=[(4, 16), (4, 64), (16, 16), (16, 64)], gen_prompt=(10, 60),
                prompts_per_slot=2, repeats=2, token_budget=4096),
}


def set_mmap_threshold(nbytes: int = 65536) -> None:
    """glibc: serve every allocation above ``nbytes`` by mmap, so freed tensors leave the RSS at once."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def cleanup(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def checkpointing(model, on: bool) -> None:
    """Gradient checkpointing on/off under transformers 5.17 (gradient_*) and 5.24+ (activation_*)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(1, vocab) for _ in range(n)]


def measure(fn, device: str, repeats: int) -> tuple[float, int]:
    """(median seconds, peak bytes) of ``fn`` after one warm-up call."""
    fn()
    sb.sync(device)
    pk = sb.peak_bytes(fn, device)
    ts = sb.time_call(fn, device, repeats, warmup=0)
    return statistics.median(ts), pk


def ratios(out: dict, base: str) -> dict:
    """speedup / memory ratio of every other way against ``base`` (kept inside each way's entry)."""
    for name, r in list(out.items()):
        if isinstance(r, dict) and "seconds" in r and name != base:
            r["speedup"] = out[base]["seconds"] / r["seconds"]
            r["memory_ratio"] = out[base]["peak_gib"] / max(r["peak_gib"], 1e-9)
    out["speedup"] = out["ours"]["speedup"]
    out["memory_ratio"] = out["ours"]["memory_ratio"]
    return out


def row(results: dict, name: str, seconds: float, tokens: int, peak_b: int, flops: float | None, peak_tf: float | None, **extra):
    r = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "peak_gib": peak_b / 2**30,
         "mfu": (flops / seconds / (peak_tf * 1e12)) if (flops and peak_tf) else None, **extra}
    results[name] = r
    return r


# --------------------------------------------------------------------------------------------------
# (a) scoring


def section_scoring(model, prof, device, peak_tf, seed) -> dict:
    segs = sb.make_segments(prof["score_n"], model.config.vocab_size, prof["prompt"], prof["completion"], seed)
    tokens = sum(len(s) for s in segs)
    flops = sb.forward_flops(model, [len(s) for s in segs])
    out: dict = {"segments": len(segs), "tokens": tokens}
    lp = {}
    ways = [("naive", lambda: score_naive(model, segs)),
            ("ours", lambda: score_segments(model, segs, token_budget=prof["token_budget"]))]
    if score_segments_varlen is not None:
        ways.append(("ours_varlen", lambda: score_segments_varlen(model, segs, token_budget=prof["token_budget"])))
    for name, fn in ways:
        t, pk = measure(fn, device, prof["repeats"])
        row(out, name, t, tokens, pk, flops, peak_tf)
        lp[name] = fn()
        cleanup(device)
    for name in lp:
        if name != "naive":
            out[name]["max_abs_logprob_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(lp["naive"], lp[name]))
    return ratios(out, "naive")


# --------------------------------------------------------------------------------------------------
# (b) SGSD scoring step, K teachers


def section_sgsd(model, prof, device, peak_tf, seed) -> dict:
    rng = random.Random(seed + 1)
    V, K = model.config.vocab_size, prof["K"]
    rollouts = []
    for _ in range(prof["rollouts"]):
        student = rand_ids(rng, rng.randint(*prof["prompt"]), V)
        comp = rand_ids(rng, rng.randint(*prof["completion"]), V)
        teachers = [rand_ids(rng, rng.randint(*prof["guidance"]), V) + student for _ in range(K)]
        rollouts.append((student, teachers, comp))
    useful = [len(s) + len(c) for s, _, c in rollouts] + [len(t) + len(c) for _, ts, c in rollouts for t in ts]
    tokens = sum(useful)
    flops = sb.forward_flops(model, useful)

    def reference():
        outs = []
        for s, ts, c in rollouts:  # one padded batch per rollout: K teacher rows + K student copies
            outs.append(score_naive(model, [Segment.of(t, c) for t in ts] + [Segment.of(s, c)] * K))
        return outs

    segs = [seg for s, ts, c in rollouts for seg in [Segment.of(s, c)] + [Segment.of(t, c) for t in ts]]

    def ours():
        return score_segments(model, segs, token_budget=prof["token_budget"])

    def ours_varlen():
        return score_segments_varlen(model, segs, token_budget=prof["token_budget"])

    out: dict = {"rollouts": len(rollouts), "K": K, "tokens": tokens,
                 "rows_reference": 2 * K * len(rollouts), "segments_ours": (K + 1) * len(rollouts)}
    ways = [("reference", reference), ("ours", ours)] + ([("ours_varlen", ours_varlen)] if score_segments_varlen else [])
    ref = None
    for name, fn in ways:
        t, pk = measure(fn, device, prof["repeats"])
        row(out, name, t, tokens, pk, flops, peak_tf, seconds_per_rollout=t / len(rollouts))
        got = fn()
        if name == "reference":
            ref = got
        else:
            diffs = []
            for r in range(len(rollouts)):
                base = r * (K + 1)
                diffs.append((ref[r][K].float() - got[base].float()).abs().max().item())  # student
                diffs += [(ref[r][k].float() - got[base + 1 + k].float()).abs().max().item() for k in range(K)]
            out[name]["max_abs_logprob_diff"] = max(diffs)
        del got
        cleanup(device)
    ref = None
    return ratios(out, "reference")


# --------------------------------------------------------------------------------------------------
# (c) training step


def section_train(model, prof, device, peak_tf, seed) -> dict:
    segs = sb.make_segments(prof["train_n"], model.config.vocab_size, prof["prompt"], prof["completion"], seed + 2)
    tokens = sum(len(s) for s in segs)
    flops = 3 * sb.forward_flops(model, [len(s) for s in segs])
    dev = torch.device(device)
    model.train()
    checkpointing(model, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-8, foreach=True)
    L = max(len(s) for s in segs)
    ids = torch.zeros(len(segs), L, dtype=torch.long)
    mask = torch.zeros(len(segs), L, dtype=torch.long)
    for b, s in enumerate(segs):
        full = s.prompt_ids + s.completion_ids
        ids[b, : len(full)] = torch.tensor(full)
        mask[b, : len(full)] = 1
    ids, mask = ids.to(dev), mask.to(dev)

    def naive_step():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        per = []
        for b, s in enumerate(segs):
            p, c = len(s.prompt_ids), len(s.completion_ids)
            tgt = torch.tensor(s.completion_ids, device=dev)
            per.append(logp[b, p - 1 : p - 1 + c].gather(-1, tgt[:, None]).mean())
        loss = -torch.stack(per).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_step():
        lps = score_segments(model, segs, grad=True, token_budget=prof["token_budget"])
        loss = -torch.stack([lp.mean() for lp in lps]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ours_varlen_step():
        with varlen_attention(model):  # backward inside: checkpointing re-runs attention there
            ours_step()

    out: dict = {"sequences": len(segs), "tokens": tokens, "padded_tokens_naive": len(segs) * L,
                 "optimizer": "AdamW (full fine-tuning)", "gradient_checkpointing": True}
    ways = [("naive", naive_step), ("ours", ours_step)] + ([("ours_varlen", ours_varlen_step)] if varlen_attention else [])
    try:
        for name, fn in ways:
            t, pk = measure(fn, device, prof["repeats"])
            row(out, name, t, tokens, pk, flops, peak_tf)
            cleanup(device)
    finally:
        del opt
        model.zero_grad(set_to_none=True)
        checkpointing(model, False)
        model.eval()
        cleanup(device)
    return ratios(out, "naive")


# --------------------------------------------------------------------------------------------------
# (d) generation


def _stop_set(rng: random.Random, vocab: int, max_new: int) -> list[int]:
    m = max(1, min(vocab - 2, round(2 * vocab / max_new)))
    return sorted(rng.sample(range(1, vocab), m))


def _hf_generate_all(model, prompts, B, P, new, stops, cache, cache_kw) -> tuple[int, list[int]]:
    """model.generate over ``prompts`` in batches of B, left-padded to P; returns (tokens, lengths)."""
    dev = next(model.parameters()).device
    stop = set(stops)
    lengths = []
    for s in range(0, len(prompts), B):
        chunk = prompts[s : s + B]
        ids = torch.zeros(len(chunk), P, dtype=torch.long)
        att = torch.zeros(len(chunk), P, dtype=torch.long)
        for b, p in enumerate(chunk):
            ids[b, P - len(p):] = torch.tensor(p)
            att[b, P - len(p):] = 1
        kw = {}
        if cache is not None:
            cache.reset()
            kw[cache_kw] = cache
        else:
            kw["cache_implementation"] = "static"
        out = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), do_sample=True, temperature=1.1,
                             top_p=0.95, top_k=20, max_new_tokens=new, eos_token_id=stops, pad_token_id=0, **kw)
        for r in out[:, P:].tolist():
            n = next((i + 1 for i, t in enumerate(r) if t in stop), len(r))
            lengths.append(n)
    return sum(lengths), lengths


def _make_static_cache(model, B, max_cache_len, device):
    try:
        from transformers import StaticCache
    except ImportError:
        return None
    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:
        return None


def section_generation(model, prof, device, args, t_end: float) -> dict:
    from stages.engine.generation.fast import FastHFBackend
    from stages.engine.generation.base import SamplingConfig

    cuda = torch.device(device).type == "cuda"
    rng = random.Random(args.seed + 3)
    V = model.config.vocab_size
    P = prof["gen_prompt"][1]
    fwd = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in fwd else "past_key_values"
    out: dict = {"sampling": "T=1.1 top_p=0.95 top_k=20", "prompt_range": list(prof["gen_prompt"]),
                 "prompts_per_slot": prof["prompts_per_slot"], "cache_kw": cache_kw, "runs": []}
    by_batch: dict[int, list[int]] = {}
    for B, new in prof["gen"]:
        by_batch.setdefault(B, []).append(new)
    for B, news in by_batch.items():
        max_len = P + max(news)
        work = {}
        for new in news:
            prompts = [rand_ids(rng, rng.randint(*prof["gen_prompt"]), V) for _ in range(prof["prompts_per_slot"] * B)]
            work[new] = (prompts, _stop_set(rng, V, new))
        # --- transformers generate, static cache (compiled decode step on CUDA)
        if time.time() > t_end:
            out["runs"].append({"batch": B, "skipped": "time budget"})
            continue
        cache = _make_static_cache(model, B, max_len, device)
        t0 = time.perf_counter()
        wp, ws = work[news[0]]
        _hf_generate_all(model, wp[:B], B, P, 8, ws, cache, cache_kw)  # warm-up: compiles the decode step
        sb.sync(device)
        warm_hf = time.perf_counter() - t0
        hf = {}
        for new in news:
            prompts, stops = work[new]
            t0 = time.perf_counter()
            ntok, lens = _hf_generate_all(model, prompts, B, P, new, stops, cache, cache_kw)
            sb.sync(device)
            t = time.perf_counter() - t0
            hf[new] = {"seconds": t, "tokens": ntok, "tokens_per_s": ntok / t, "mean_len": ntok / len(lens)}
            print(f"  generate  B={B:4d} new={new:5d}: {ntok / t:10,.0f} tok/s ({t:.1f} s, mean len {ntok / len(lens):.0f})", flush=True)
        del cache
        if cuda:
            torch._dynamo.reset()
            try:
                from torch._inductor.cudagraph_trees import reset_cudagraph_trees

                reset_cudagraph_trees()
            except Exception:
                pass
        cleanup(device)
        # --- FastHFBackend
        eng = FastHFBackend(model, None, max_batch=B, max_len=max_len, compile=cuda and not args.no_compile)
        t0 = time.perf_counter()
        wp, ws = work[news[0]]
        eng.generate(wp[:B], SamplingConfig(temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=8, stop_token_ids=ws))
        sb.sync(device)
        warm_fast = time.perf_counter() - t0
        for new in news:
            prompts, stops = work[new]
            cfg = SamplingConfig(n=1, temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=new, seed=args.seed,
                                 stop_token_ids=stops)
            t0 = time.perf_counter()
            comps = eng.generate(prompts, cfg)
            sb.sync(device)
            t = time.perf_counter() - t0
            ntok = sum(len(c.token_ids) for c in comps)
            st = dict(eng.stats)
            fast = {"seconds": t, "tokens": ntok, "tokens_per_s": ntok / t, "mean_len": ntok / len(comps),
                    "graphs_captured": st.get("graphs", 0), "capture_s": st.get("capture_s", 0.0),
                    "tokens_per_s_excl_capture": ntok / max(t - st.get("capture_s", 0.0), 1e-9),
                    "moved_slots": st.get("moved_slots", 0), "steps": st.get("steps", 0), "fallbacks": list(eng.fallbacks)}
            print(f"  FastHF    B={B:4d} new={new:5d}: {ntok / t:10,.0f} tok/s ({t:.1f} s, mean len {ntok / len(comps):.0f}, "
                  f"{fast['graphs_captured']} graphs captured in {fast['capture_s']:.1f} s)", flush=True)
            out["runs"].append({"batch": B, "new_tokens": new, "prompts": len(prompts), "stop_set": len(stops),
                                "generate_static": hf[new], "fast": fast,
                                "speedup": fast["tokens_per_s"] / hf[new]["tokens_per_s"],
                                "warmup_s_generate": warm_hf, "warmup_s_fast": warm_fast,
                                "fast_compile": eng.compile, "fast_cuda_graphs": eng.cuda_graphs, "fast_impl": eng.impl})
        eng.close()
        del eng
        cleanup(device)
    return out


# --------------------------------------------------------------------------------------------------
# (0) correctness of FastHFBackend's device path on a tiny fp32 model


def section_check(device: str, seed: int) -> dict:
    """Greedy FastHFBackend (CUDA graphs on CUDA, eager compile off) == model.generate token for token, and
    sampled log-probs at T=1 == score_segments, on the tiny-shaped model in fp32 (exact enough to compare)."""
    from stages.engine.generation.fast import FastHFBackend
    from stages.engine.generation.base import SamplingConfig

    model = sb.build_model("tiny", device, torch.float32, seed=seed)
    rng = random.Random(seed)
    prompts = [rand_ids(rng, rng.randint(3, 40), model.config.vocab_size) for _ in range(12)]
    eng = FastHFBackend(model, None, max_batch=4, kv_bucket=16, compile=False)
    greedy = eng.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=24))
    dev = torch.device(device)
    same = 0
    for p, c in zip(prompts, greedy):
        ref = model.generate(torch.tensor([p], device=dev), attention_mask=torch.ones(1, len(p), dtype=torch.long, device=dev),
                             do_sample=False, max_new_tokens=24, pad_token_id=0, eos_token_id=None)[0, len(p):].tolist()
        same += ref == c.token_ids
    sampled = eng.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_new_tokens=24, seed=seed))
    ref = score_segments(model, [Segment.of(prompts[c.prompt_index], c.token_ids) for c in sampled])
    diff = max((torch.tensor(c.logprobs) - r.cpu()).abs().max().item() for c, r in zip(sampled, ref))
    out = {"greedy_equal_generate": f"{same}/{len(prompts)}", "max_abs_logprob_diff_vs_scoring": diff,
           "cuda_graphs": eng.cuda_graphs, "graphs_captured": eng.stats.get("graphs", 0), "fallbacks": list(eng.fallbacks)}
    out["ok"] = same == len(prompts) and diff < 1e-4
    return out


# --------------------------------------------------------------------------------------------------
# report


def fmt(x, spec=",.0f", none="n/a"):
    return none if x is None else format(x, spec)


def table(res: dict) -> str:
    lines = ["| section | way | tokens/s | MFU | peak GiB | time | vs baseline |", "|---|---|---:|---:|---:|---:|---:|"]

    def pair(sec, base, label):
        d = res.get(sec)
        if not isinstance(d, dict) or base not in d:
            lines.append(f"| {label} | {'error: ' + str(d.get('error'))[:80] if isinstance(d, dict) else 'not run'} | | | | | |")
            return
        for way in [base] + [w for w in ("ours", "ours_varlen") if w in d]:
            r = d[way]
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            vs = f"{r['speedup']:.2f}x speed, {r['memory_ratio']:.2f}x less memory" if way != base else "baseline"
            lines.append(f"| {label} | {way} | {fmt(r['tokens_per_s'])} | {mfu} | {r['peak_gib']:.3f} | {r['seconds']:.3f} s | {vs} |")

    chk = res.get("check")
    if isinstance(chk, dict):
        txt = (f"greedy == generate {chk['greedy_equal_generate']}, max abs dlogp vs scoring {chk['max_abs_logprob_diff_vs_scoring']:.1e}, "
               f"CUDA graphs {chk['cuda_graphs']}" if "ok" in chk else f"error: {str(chk.get('error'))[:100]}")
        lines.append(f"| (0) FastHFBackend check (tiny fp32) | {txt} | | | | | {'ok' if chk.get('ok') else 'FAILED'} |")
    pair("scoring", "naive", "(a) scoring")
    pair("sgsd_step", "reference", "(b) SGSD step, K=8")
    pair("train_step", "naive", "(c) training step")
    g = res.get("generation")
    if isinstance(g, dict) and "runs" in g:
        for r in g["runs"]:
            if "skipped" in r:
                lines.append(f"| (d) generation B={r['batch']} | skipped ({r['skipped']}) | | | | | |")
                continue
            h, f = r["generate_static"], r["fast"]
            lab = f"(d) generation B={r['batch']} new={r['new_tokens']}"
            lines.append(f"| {lab} | generate (static cache) | {fmt(h['tokens_per_s'])} | | | {h['seconds']:.1f} s | baseline |")
            lines.append(f"| {lab} | FastHFBackend | {fmt(f['tokens_per_s'])} | | | {f['seconds']:.1f} s | {r['speedup']:.2f}x |")
    elif isinstance(g, dict):
        lines.append(f"| (d) generation | error: {str(g.get('error'))[:100]} | | | | | |")
    return "\n".join(lines)


def report(res: dict, args, card: str) -> str:
    cpu = res["device"] == "cpu"
    title = (f"## gpu_suite on CPU, shape `{res['shape']}` (CPU/tiny figures, NOT GPU figures)" if cpu
             else f"## gpu_suite on {card}, shape `{res['shape']}`")
    meta = (f"{res['date']} · torch {res['torch']} · transformers {res['transformers']} · dtype {res['dtype']} · "
            f"CPU threads {res['cpu_threads']} · "
            f"params (matmul) {res['matmul_params'] / 1e6:.1f} M · wall {res['wall_s']:.0f} s")
    notes = ("MFU = useful FLOPs / time / peak bf16 dense ({} TFLOP/s); forward 2·P·tokens + causal attention, "
             "training 3x forward. Tokens count real tokens only.".format(fmt(res.get("peak_tflops"), ".0f")))
    return f"{title}\n\n{meta}\n\n{table(res)}\n\n{notes}\n\n`python bench/gpu_suite.py {' '.join(args.argv)}`\n"


def check_imports() -> int:
    """Import the suite's code path in a fresh interpreter where polars cannot be imported (the GPU machine
    has no polars); exit status 1 and the failing modules when something on the path needs it."""
    import subprocess

    bad = []
    for mod in ("stages.engine.scoring", "stages.engine.generation", "stages.engine.generation.fast"):
        code = f"import sys; sys.modules['polars'] = None; sys.path.insert(0, {str(REPO)!r}); import {mod}"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if r.returncode != 0:
            bad.append(f"{mod}: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    print(json.dumps({"imports_without_polars": "ok" if not bad else bad}))
    return 1 if bad else 0


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default=None, choices=sorted(sb.SHAPES), help="default: qwen3-1.7b on CUDA, tiny on CPU")
    ap.add_argument("--sections", default="0abcd", help="which of 0 (FastHF check) a b c d to run")
    ap.add_argument("--budget-s", type=float, default=420.0, help="generation runs that would start after this many seconds are skipped")
    ap.add_argument("--no-compile", action="store_true", help="FastHFBackend without torch.compile (CUDA graphs only)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on CPU: OpenMP threads stall on a busy shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--results", default=str(BENCH / "RESULTS.md"))
    ap.add_argument("--check-imports", action="store_true", help="only check that the code path imports without polars")
    args = ap.parse_args(argv)
    if args.check_imports:
        raise SystemExit(check_imports())
    args.argv = argv
    cuda = torch.device(args.device).type == "cuda"
    prof = dict(PROFILES["cuda" if cuda else "cpu"])
    shape = args.shape or ("qwen3-1.7b" if cuda else "tiny")
    if not cuda:
        set_mmap_threshold()
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    t_end = t_start + args.budget_s
    peak_tf, card = sb.peak_tflops(args.device, args.peak_tflops)
    model = sb.build_model(shape, args.device, seed=args.seed)
    import transformers

    res: dict = {"device": "cuda" if cuda else "cpu", "card": card, "shape": shape, "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "matmul_params": sb.matmul_params(model),
                 "peak_tflops": peak_tf, "profile": {k: v for k, v in prof.items()}, "fast_import_error": FAST_IMPORT_ERROR,
                 "cpu_threads": torch.get_num_threads()}
    print(f"gpu_suite: {card} shape={shape} dtype={res['dtype']} torch {torch.__version__} transformers {transformers.__version__}", flush=True)
    sections = [("0", "check", lambda: section_check(args.device, args.seed)),
                ("a", "scoring", lambda: section_scoring(model, prof, args.device, peak_tf, args.seed)),
                ("b", "sgsd_step", lambda: section_sgsd(model, prof, args.device, peak_tf, args.seed)),
                ("c", "train_step", lambda: section_train(model, prof, args.device, peak_tf, args.seed)),
                ("d", "generation", lambda: section_generation(model, prof, args.device, args, t_end))]
    key = f"suite-{res['device']}-{shape}"
    for letter, name, fn in sections:
        if letter not in args.sections:
            continue
        t0 = time.time()
        print(f"({letter}) {name} ...", flush=True)
        try:
            res[name] = fn()
        except Exception as e:  # one failing section must not lose the others' figures
            traceback.print_exc()
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        cleanup(args.device)
        res[name]["section_s"] = time.time() - t0
        res["wall_s"] = time.time() - t_start
        d = res[name]
        if "speedup" in d:
            print(f"({letter}) {name}: ours {d['speedup']:.2f}x speed, {d.get('memory_ratio', float('nan')):.2f}x less memory "
                  f"({res[name]['section_s']:.0f} s)", flush=True)
        sb.write_block(Path(args.results), key, report(res, args, card))
    res["wall_s"] = time.time() - t_start
    text = report(res, args, card)
    sb.write_block(Path(args.results), key, text)
    print(table(res), flush=True)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
