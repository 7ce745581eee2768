"""FastHFBackend: continuous batching over a static slot KV cache (issue 6), on the tiny model on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from stages.engine.generation.fast import FastHFBackend, sample_tokens
from stages.engine.generation.base import SamplingConfig
from stages.engine.scoring import Segment, score_segments

TEXTS = [
    "hello there",
    "What is 2+3? Let me think step by step.",
    "x",
    "Answer: \\boxed{5}",
    "a b c d e f g h i j k l m n o p q r s t",
    "The sum of 1 and 2",
    "Therefore the answer is",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok, _ = tiny
    return [tok.encode(t) for t in TEXTS]


def _reference_greedy(model, prompt, max_new, eos_ids):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new, eos_token_id=eos_ids, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("impl", ["llama", "model"])
def test_greedy_matches_model_generate_with_refill(tiny, prompts, impl):
    model, tok, _ = tiny
    eng = FastHFBackend(model, tok, max_batch=3, impl=impl)  # 7 prompts through 3 slots
    assert eng.impl == impl and not eng.compile and not eng.cuda_graphs
    done = []
    out = eng.generate(prompts, SamplingConfig(n=1, temperature=0, max_new_tokens=16), on_done=done.append)
    assert sum(done) == len(prompts)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, 0) for i in range(len(prompts))]
    for i, p in enumerate(prompts):
        assert out[i].token_ids == _reference_greedy(model, p, 16, eng.eos_ids), f"prompt {i}"
        assert out[i].text == tok.decode(out[i].token_ids, skip_special_tokens=True)
    assert eng.stats["prefill_tokens"] > 0 and eng.stats["steps"] > 0


def test_stop_tokens_end_each_sequence_on_its_own(tiny, prompts):
    model, tok, _ = tiny
    eng = FastHFBackend(model, tok, max_batch=4)
    cfg = SamplingConfig(n=1, temperature=0, max_new_tokens=16)
    free = eng.generate(prompts, cfg)
    # a token that one sequence emits early: sequences containing it must stop right after it, others run on
    stop = free[1].token_ids[2]
    out = eng.generate(prompts, SamplingConfig(n=1, temperature=0, max_new_tokens=16, stop_token_ids=[stop]))
    lengths = set()
    for f, c in zip(free, out):
        if stop in f.token_ids:
            cut = f.token_ids.index(stop) + 1
            assert c.token_ids == f.token_ids[:cut] and c.finish_reason == "stop"
            assert c.logprobs == pytest.approx(f.logprobs[:cut], abs=1e-5)
        else:
            assert c.token_ids == f.token_ids and c.finish_reason == "length"
        lengths.add(len(c.token_ids))
    assert len(lengths) > 1  # different stop points in one run
    assert tok.eos_token_id in eng.eos_ids


def test_eos_from_generation_config_stops(tiny, prompts):
    """Making the model's EOS the first greedy token of a prompt: that completion is exactly [EOS]."""
    model, tok, _ = tiny
    eng = FastHFBackend(model, tok, max_batch=2)
    first = eng.generate(prompts[:3], SamplingConfig(temperature=0, max_new_tokens=4))[0].token_ids[0]
    m2 = copy.deepcopy(model)
    m2.generation_config.eos_token_id = int(first)
    eng2 = FastHFBackend(m2, None, max_batch=2)
    out = eng2.generate(prompts[:3], SamplingConfig(temperature=0, max_new_tokens=4))
    assert out[0].token_ids == [first] and out[0].finish_reason == "stop"


def test_sampling_reproducible_and_batch_invariant(tiny, prompts):
    model, tok, _ = tiny
    cfg = SamplingConfig(n=3, temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=12, seed=7)
    a = FastHFBackend(model, tok, max_batch=4).generate(prompts, cfg)
    b = FastHFBackend(model, tok, max_batch=4).generate(prompts, cfg)
    c = FastHFBackend(model, tok, max_batch=16).generate(prompts, cfg)  # other slots, other neighbours
    assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in c]
    assert len(a) == 3 * len(prompts)
    # the three samples of a prompt differ, and another seed gives other samples
    assert len({tuple(x.token_ids) for x in a[:3]}) > 1
    d = FastHFBackend(model, tok, max_batch=4).generate(prompts, SamplingConfig(**{**cfg.__dict__, "seed": 8}))
    assert [x.token_ids for x in a] != [x.token_ids for x in d]


def test_prompt_keys_make_samples_independent_of_the_call_and_backend(tiny, prompts):
    """Seeded per prompt key: a prompt draws the same samples alone, among others, in another order, with
    the plain hf loop or the hf-fast engine (both use the same counter-based Gumbel noise)."""
    from stages.engine.generation.hf import HFBackend

    model, tok, _ = tiny
    keys = [1000 + 37 * i for i in range(len(prompts))]
    cfg = SamplingConfig(n=2, temperature=1.1, top_p=0.95, top_k=20, max_new_tokens=10, seed=5, batch_size=3,
                         prompt_keys=keys)
    full = [x.token_ids for x in FastHFBackend(model, tok, max_batch=4).generate(prompts, cfg)]
    plain = [x.token_ids for x in HFBackend(model, tok).generate(prompts, cfg)]
    assert plain == full
    order = [5, 0, 3]  # a shard of three prompts, in another order, in a smaller batch
    sub = SamplingConfig(**{**cfg.__dict__, "prompt_keys": [keys[i] for i in order], "batch_size": 2})
    got = [x.token_ids for x in HFBackend(model, tok).generate([prompts[i] for i in order], sub)]
    assert got == [full[2 * i + s] for i in order for s in range(2)]
    # keyed by index (no keys), the prompt at position 0 of the shard draws prompt 0's stream instead
    idx = SamplingConfig(**{**sub.__dict__, "prompt_keys": None})
    assert [x.token_ids for x in HFBackend(model, tok).generate([prompts[i] for i in order], idx)] != got


def test_sampled_logprobs_match_scoring_core(tiny, prompts):
    model, tok, _ = tiny
    eng = FastHFBackend(model, tok, max_batch=3)
    out = eng.generate(prompts, SamplingConfig(n=2, temperature=1.0, max_new_tokens=20, seed=3))
    segs = [Segment.of(prompts[c.prompt_index], c.token_ids) for c in out]
    ref = score_segments(model, segs)
    for c, r in zip(out, ref):
        assert torch.allclose(torch.tensor(c.logprobs), r, atol=1e-4), (c.prompt_index, c.sample_index)


def test_sampler_distribution_follows_top_k_top_p():
    torch.manual_seed(0)
    V, N = 30, 20000
    logits = torch.randn(V) * 2
    T, k, p = 1.2, 10, 0.9
    tok, lp = sample_tokens(logits.expand(N, V), greedy=False, top_k=k, use_top_p=True,
                            temperature=torch.tensor(T), top_p=torch.tensor(p),
                            keys=torch.arange(N) * 2654435761 % 2**32, steps=torch.zeros(N, dtype=torch.long))
    s = logits / T
    filt = s.masked_fill(s < torch.topk(s, k).values[-1], float("-inf"))
    sl, idx = torch.sort(filt, descending=True)
    pr = F.softmax(sl, -1)
    sl = sl.masked_fill((pr.cumsum(-1) - pr) > p, float("-inf"))
    want = F.softmax(torch.full_like(s, float("-inf")).scatter(-1, idx, sl), -1)
    got = torch.bincount(tok, minlength=V).float() / N
    assert 0.5 * (got - want).abs().sum() < 0.02
    assert set(tok.unique().tolist()) <= set(torch.nonzero(want > 0).flatten().tolist())
    assert torch.allclose(lp, F.log_softmax(s, -1)[tok])


def test_update_weights_in_place_changes_outputs(tiny, prompts):
    model, tok, _ = tiny
    mine = copy.deepcopy(model)
    eng = FastHFBackend(mine, tok, max_batch=3)
    cfg = SamplingConfig(temperature=0, max_new_tokens=12)
    before = [c.token_ids for c in eng.generate(prompts, cfg)]
    ptrs = [p.data_ptr() for p in mine.parameters()]
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            if p.dim() > 1:
                p.add_(torch.randn_like(p) * 0.05)
    eng.update_weights(new)
    assert [p.data_ptr() for p in mine.parameters()] == ptrs and eng.model is mine
    after = [c.token_ids for c in eng.generate(prompts, cfg)]
    assert after != before
    assert after == [_reference_greedy(new, p, 12, eng.eos_ids) for p in prompts]


def test_update_weights_merges_lora(tiny, prompts):
    peft = pytest.importorskip("peft")
    model, tok, _ = tiny
    eng = FastHFBackend(copy.deepcopy(model), tok, max_batch=4)
    lora = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    eng.update_weights(lora)
    cfg = SamplingConfig(temperature=0, max_new_tokens=10)
    got = [c.token_ids for c in eng.generate(prompts, cfg)]
    merged = lora.merge_and_unload()
    assert got == [_reference_greedy(merged, p, 10, eng.eos_ids) for p in prompts]


def test_tail_compaction_keeps_results(tiny, prompts):
    """Stops at different points let slots drain; live slots move to low rows and the batch shrinks; results
    equal a run without compaction, multi-step windows or KV buckets."""
    model, tok, _ = tiny
    cfg = SamplingConfig(n=3, temperature=1.0, max_new_tokens=24, seed=1, stop_token_ids=list(range(40, 80)))
    # 21 jobs: the batch shrinks 16 -> 8 at the tail; 3 steps between host checks (finished slots idle
    # frozen until harvested), attended KV length in buckets of 16
    eng = FastHFBackend(model, tok, max_batch=16, sync_every=3, kv_bucket=16)
    out = eng.generate(prompts, cfg)
    assert eng.stats.get("moved_slots", 0) > 0
    ref = FastHFBackend(model, tok, max_batch=4).generate(prompts, cfg)  # below the smallest bucket: no moves
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    assert {c.finish_reason for c in out} == {"stop", "length"}


def test_fixed_max_len_cuts_and_rejects(tiny, prompts):
    model, tok, _ = tiny
    eng = FastHFBackend(model, tok, max_batch=2, max_len=24)
    with pytest.warns(UserWarning, match="max_len"):
        out = eng.generate(prompts[:2], SamplingConfig(temperature=0, max_new_tokens=40))
    for p, c in zip(prompts[:2], out):
        assert len(p) + len(c.token_ids) <= 24 and c.finish_reason in ("length", "stop")
    with pytest.raises(ValueError, match="does not fit"):
        eng.generate([list(range(30))], SamplingConfig(temperature=0, max_new_tokens=4))


def test_varlen_scoring_matches_packed_scoring_with_grads(tiny, prompts):
    """score_segments_varlen (per-sequence attention in the packed row) = score_segments, values and grads."""
    from stages.engine.scoring import score_segments_varlen, varlen_attention

    model, _, _ = tiny
    m = copy.deepcopy(model)
    segs = [Segment.of(p, list(reversed(p)) + p[:3]) for p in prompts]
    ref = score_segments(m, segs, token_budget=64)  # several micro-batches, several sequences per row
    got = score_segments_varlen(m, segs, token_budget=64)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ref, got))
    assert m.config._attn_implementation == model.config._attn_implementation  # restored
    with pytest.raises(ValueError, match="varlen_attention"):
        score_segments_varlen(m, segs, grad=True)

    m.train()
    if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def grads(ctx):
        m.zero_grad(set_to_none=True)
        with ctx:
            fn = score_segments_varlen if isinstance(ctx, varlen_attention) else score_segments
            lps = fn(m, segs, token_budget=64, grad=True)
            (-torch.stack([lp.mean() for lp in lps]).mean()).backward()
        return [p.grad.clone() for p in m.parameters()]

    import contextlib

    g_ref = grads(contextlib.nullcontext())
    g_var = grads(varlen_attention(m))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ref, g_var))


@pytest.mark.slow
@pytest.mark.skipif(not (torch.cuda.is_available() or __import__("os").environ.get("SGSD_TEST_COMPILE")),
                    reason="needs CUDA (CUDA graphs) or SGSD_TEST_COMPILE=1 (torch.compile on CPU takes minutes)")
def test_compiled_and_graph_captured_engine_matches_eager(tiny, prompts):
    """On CUDA: compiled decoder + CUDA-graph decode step; on CPU (opt-in): compiled decoder only.  Greedy and
    sampled outputs equal the eager engine's, across KV buckets, batch buckets and slot refills."""
    model, tok, _ = tiny
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = copy.deepcopy(model).to(dev)
    many = prompts * 4
    eager = FastHFBackend(m, tok, max_batch=16, kv_bucket=16, compile=False, cuda_graphs=False, sync_every=4)
    fast = FastHFBackend(m, tok, max_batch=16, kv_bucket=16, compile=True, sync_every=4)
    assert fast.cuda_graphs == (dev == "cuda")
    for cfg in (SamplingConfig(temperature=0, max_new_tokens=40, stop_token_ids=list(range(40, 60))),
                SamplingConfig(n=2, temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=40, seed=5,
                               stop_token_ids=list(range(40, 60)))):
        a, b = fast.generate(many, cfg), eager.generate(many, cfg)
        assert [x.token_ids for x in a] == [x.token_ids for x in b]
        assert all(torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4) for x, y in zip(a, b))
    if dev == "cuda":
        assert fast.stats["graphs"] > 0
