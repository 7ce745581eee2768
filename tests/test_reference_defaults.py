"""Our defaults against the public reference code (walawalagoose/SGSD), one assertion per setting that matters for
reproduction.  docs/REFERENCE.md is the same table with the reference's file and line for every row.

Expected values are written out by hand from the reference's scripts and trainers, never read from our code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from conftest import DEMO_BANK, DEMO_PROBLEMS

ROOT = Path(__file__).resolve().parent.parent


def _recipe(name: str) -> dict:
    from stages import loop
    from stages.engine.config import load_toml

    p = ROOT / "configs" / name
    return loop.build_sections(load_toml(p), str(p)).resolved()


# (section, field): value -- scripts/run_sgsd.sh, skill/training.py, skill/sgsd_trainer.py
SGSD = {
    ("loop", "steps"): 200,                                   # run_sgsd.sh:31 max_steps
    ("loop", "prompts_per_step"): 16,                         # run_sgsd.sh:29-30 x 4 processes
    ("loop", "skill_update_every"): 25,                       # run_sgsd.sh:60
    ("rollout", "n"): 1,
    ("rollout", "temperature"): 1.1,                          # run_sgsd.sh:47
    ("rollout", "top_p"): 0.95,                               # run_sgsd.sh:48
    ("rollout", "top_k"): 20,                                 # run_sgsd.sh:49
    ("rollout", "max_new_tokens"): 1024,                      # run_sgsd.sh:37
    ("rollout", "thinking"): False,                           # sgsd_data_collator.py:49
    ("score_teachers", "retrieval"): "embedding",             # run_sgsd.sh:56
    ("score_teachers", "encoder"): "Qwen/Qwen3-Embedding-0.6B",  # run_sgsd.sh:57
    ("score_teachers", "query_prompt"): False,                # skill_memory.py:179-184 (raw problem)
    ("score_teachers", "teacher_thinking"): "on",             # sgsd_trainer.py:195-200
    ("score_teachers", "k"): 8,                               # run_sgsd.sh:58
    ("score_teachers", "scoring_temperature"): 1.0,           # sgsd_trainer.py:697 (no division by T)
    ("polarize", "clip"): 3.0,                                # run_sgsd.sh:52
    ("polarize", "stance_threshold"): 0.05,                   # run_sgsd.sh:53
    ("train", "lr"): 5e-6,                                    # run_sgsd.sh:27
    ("train", "lr_schedule"): "linear",                       # HF TrainingArguments default lr_scheduler_type
    ("train", "warmup_steps"): 0,
    ("train", "max_grad_norm"): 0.1,                          # run_sgsd.sh:28
    ("train", "lora"): True,
    ("train", "lora_r"): 64,                                  # run_sgsd.sh:44
    ("train", "lora_alpha"): 128,                             # run_sgsd.sh:45
    ("train", "lora_dropout"): 0.0,                           # opsd_trainer.py:201-202 disable_dropout_in_model
    ("train", "teacher_mode"): "live",                        # sgsd_trainer.py:249-256 (no fixed/EMA flag)
    ("train", "tau"): 1.0,                                    # run_sgsd.sh:50
    ("update_skills", "success_threshold"): 0.8,              # run_sgsd.sh:61
    ("update_skills", "max_new_items"): 5,                    # run_sgsd.sh:62
    ("update_skills", "capacity"): 30,                        # run_sgsd.sh:64
}
OPSD = {
    ("loop", "steps"): 300,                                   # run_opsd.sh:29
    ("loop", "prompts_per_step"): 32,                         # run_opsd.sh:27-28 x 4 processes
    ("rollout", "temperature"): 1.1,                          # run_opsd.sh:49
    ("rollout", "top_p"): 0.95,
    ("rollout", "top_k"): 20,
    ("rollout", "max_new_tokens"): 1024,                      # run_opsd.sh:35
    ("rollout", "thinking"): False,                           # data/data_collator.py:43
    ("train", "teacher_thinking"): "on",                      # data/data_collator.py:76
    ("train", "scoring_temperature"): None,                   # -> the rollout's 1.1 (opsd_trainer.py:455-457)
    ("train", "teacher_mode"): "fixed",                       # run_opsd.sh:39
    ("train", "kl_clip"): 0.05,                               # run_opsd.sh:40
    ("train", "kl_top_k"): 0,                                 # opsd_train.py:58-60
    ("train", "lr"): 5e-6,
    ("train", "lr_schedule"): "linear",
    ("train", "max_grad_norm"): 0.1,                          # run_opsd.sh:26
    ("train", "lora_dropout"): 0.0,                           # opsd_trainer.py:201-202
}
GRPO = {
    ("loop", "steps"): 150,                                   # x num_iterations 2 = max_steps 300 (run_grpo.sh:31)
    ("loop", "prompts_per_step"): 4,                          # 2 x 4 x 4 processes / 8 generations
    ("rollout", "n"): 8,                                      # run_grpo.sh:37
    ("rollout", "temperature"): 1.2,                          # run_grpo.sh:38
    ("rollout", "top_p"): 1.0,                                # TRL GRPOConfig default
    ("rollout", "top_k"): 0,
    ("rollout", "max_new_tokens"): 16000,                     # run_grpo.sh:36
    ("rollout", "thinking"): True,                            # dataset_adapter.py:216 (default template)
    ("train", "num_iterations"): 2,                           # run_grpo.sh:30
    ("train", "loss_agg"): "sequence-mean",                   # run_grpo.sh:40 loss_type grpo
    ("train", "old_logprobs"): "policy",                      # TRL: pi_old from the training model
    ("train", "kl_beta"): 0.0,                                # run_grpo.sh:39
    ("train", "clip_eps"): 0.2,                               # TRL default epsilon
    ("train", "scale_std"): True,                             # run_grpo.sh:41 scale_rewards group
    ("train", "lr"): 5e-6,                                    # run_grpo.sh:26
    ("train", "lr_schedule"): "linear",
    ("train", "max_grad_norm"): 1.0,                          # HF default (not set in run_grpo.sh)
    ("train", "lora_dropout"): 0.05,                          # TRL ModelConfig lora_dropout default
}
EVAL = {("eval", "protocol"): "paper"}                        # eval/run_eval.sh:17-24


@pytest.mark.parametrize("name,want", [("sgsd_qwen3_1.7b.toml", SGSD), ("opsd_qwen3_1.7b.toml", OPSD),
                                       ("grpo_qwen3_1.7b.toml", GRPO)])
def test_paper_recipes_pin_the_reference_settings(name, want):
    r = _recipe(name)
    for (sec, field), value in {**want, **EVAL}.items():
        assert r[sec][field] == value, f"{name}: {sec}.{field} = {r[sec][field]!r}, reference {value!r}"
    assert r["train"]["lora_target"] == "all-linear"  # q,k,v,o,gate,up,down: run_*.sh lora_target_modules


def test_eval_protocol_is_the_reference_one():
    from stages.eval import PROTOCOLS

    # eval/run_eval.sh:17-24 + --enable_thinking (:31); TOP_K=-1 is off
    assert PROTOCOLS["paper"] == dict(n=12, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=38912, thinking=True)


def test_stage_defaults_follow_the_reference():
    from stages.mine_skills import MineSkillsConfig, WRITER_MAX_NEW_TOKENS as MINE_W
    from stages.score_teachers import ScoreTeachersConfig
    from stages.train import TrainConfig
    from stages.update_skills import WRITER_MAX_NEW_TOKENS as UPDATE_W

    sc = ScoreTeachersConfig(model="m")
    assert (sc.retrieval, sc.encoder, sc.query_prompt, sc.teacher_thinking, sc.k) == ("embedding", None, False, "on", 8)
    m = MineSkillsConfig()
    # generate_math_memories.py:34-38: 256 problems, 38,912 tokens, T 1.0, top_p 0.95, default (thinking) template
    assert (m.n_problems, m.max_new_tokens, m.temperature, m.top_p, m.thinking) == (256, 38912, 1.0, 0.95, True)
    assert (MINE_W, UPDATE_W) == (4096, 2048)  # generate_math_skills.py:33, skill_updater.py:47
    t = TrainConfig(model="m")
    assert (t.lr, t.max_grad_norm, t.loss_agg, t.old_logprobs, t.teacher_thinking) == (5e-6, 0.1, "sequence-mean", "policy", "on")
    assert TrainConfig(model="m", objective="grpo").resolved().lora_dropout == 0.05
    assert TrainConfig(model="m", objective="sgsd").resolved().lora_dropout == 0.0


def test_linear_schedule_decays_to_zero_like_hf():
    from stages.engine.training import lr_lambda

    f = lr_lambda(warmup_steps=0, schedule="linear", min_lr_ratio=0.0, horizon=200)
    # HF get_linear_schedule_with_warmup, no warmup: (200 - s) / 200
    assert [f(s) for s in (0, 50, 100, 199, 200)] == pytest.approx([1.0, 0.75, 0.5, 0.005, 0.0])


# ---------------------------------------------------------------------------------------------- prompts


def test_teacher_prompt_is_the_reference_guidance_block():
    from stages.engine.prompts import teacher_prompt

    skill = {"title": "Casework", "principle": "Split by parity.", "when_to_apply": "Integer answers."}
    mistake = {"description": "Dropping a case.", "why_it_happens": "Haste.", "how_to_avoid": "List cases first."}
    # skill_memory.py:298-332 format_for_prompt + training.py:236 + sgsd_trainer.py:190-193, written out
    want = ("You may use the following retrieved math-reasoning skills as soft guidance. Solve the current problem "
            "independently and do not quote the skills verbatim.\n\n"
            "### General Principles\n- **Casework**: Split by parity.\n  _Apply when: Integer answers._\n\n"
            "### Mistakes to Avoid\n- **Don't**: Dropping a case.\n  **Instead**: List cases first.\n\n"
            "Problem: Find x.\n\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert teacher_prompt("Find x.", skill, mistake) == want
    # empty when_to_apply / how_to_avoid: the reference leaves those lines out (skill_memory.py:309, 321)
    short = teacher_prompt("Find x.", {**skill, "when_to_apply": ""}, {**mistake, "how_to_avoid": ""})
    assert "_Apply when" not in short and "**Instead**" not in short and "- **Don't**: Dropping a case.\n\nProblem" in short


def test_opsd_teacher_prompt_is_the_reference_one():
    from stages.engine.prompts import opsd_teacher_prompt

    want = ("Problem: Find x.\n\nHere is a reference solution to this problem:\n"
            "=== Reference Solution Begin ===\nThe answer is \\boxed{7}.\n=== Reference Solution End ===\n"
            "\n\nAfter reading the reference solution above, make sure you truly understand the reasoning behind each "
            "step - do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same "
            "final answer to the problem above. Think step by step, explore different approaches, and don't be afraid "
            "to backtrack or reconsider if something doesn't work out:\n"
            "\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert opsd_teacher_prompt("Find x.", "7") == want
    assert "The answer is \\boxed{7}." in opsd_teacher_prompt("Find x.", "\\boxed{7}")


def test_teacher_prompts_think_while_the_student_does_not(tmp_path, tiny, tiny_model_dir):
    """score-teachers default: teacher chat template with thinking on, recorded in the manifest; 'rollout' keeps
    the rollout's flag (the student's empty think block)."""
    import json

    from stages import rollout, score_teachers

    model, tok, spec = tiny
    rollout.run(rollout.RolloutConfig(model=str(tiny_model_dir), problems=str(DEMO_PROBLEMS), limit=2, max_new_tokens=4,
                                      backend="hf", device="cpu", dtype="fp32"), tmp_path, loaded=tiny)
    ro = pl.read_parquet(tmp_path / "rollout.parquet")
    empty_think = "<think>\n\n</think>"
    assert not ro["thinking"].any() and empty_think in ro["prompt"][0]
    for mode, has_empty in (("on", False), ("rollout", True)):
        cfg = score_teachers.ScoreTeachersConfig(model=str(tiny_model_dir), bank=str(DEMO_BANK), k=2, device="cpu",
                                                 dtype="fp32", retrieval="lexical", teacher_thinking=mode)
        score_teachers.run(cfg, tmp_path, force=True, loaded=tiny)
        st = pl.read_parquet(tmp_path / "score_teachers.parquet")
        assert all((empty_think in t) == has_empty for t in st["teacher_prompt"].to_list())
        man = json.loads((tmp_path / "score_teachers.manifest.json").read_text())
        assert man["teacher_thinking"] == mode and man["config"]["teacher_thinking"] == mode


# ---------------------------------------------------------------------------------------------- retrieval


class _FakeEncoder:
    """Fixed random unit vectors per text; records whether the query prompt was asked for."""

    name, kind = "fake", "fake"

    def __init__(self, dim=6):
        self.dim, self.query_flags, self.vecs = dim, [], {}

    def vec(self, text):
        if text not in self.vecs:
            v = np.random.default_rng(abs(hash(text)) % 2**32).normal(size=self.dim)
            self.vecs[text] = (v / np.linalg.norm(v)).astype(np.float32)
        return self.vecs[text]

    def encode(self, texts, *, query=False, batch_size=32):
        if query:
            self.query_flags.append(True)
        elif texts and texts[0] in QUERIES:
            self.query_flags.append(False)
        return np.stack([self.vec(t) for t in texts]) if texts else np.zeros((0, self.dim), np.float32)


QUERIES = [f"Compute {a} + {b} and find the remainder mod {a + b + 3}." for a in range(5) for b in range(3)]


def test_retrieval_picks_the_true_top_k_and_encodes_raw_queries():
    from stages.engine.skills.bank import load_bank, mistake_text, skill_text
    from stages.engine.skills.retrieval import EmbeddingRetriever, retrieve_many

    bank = load_bank(DEMO_BANK)
    enc = _FakeEncoder()
    retr = EmbeddingRetriever(bank, enc)
    k = 3
    pools = retrieve_many(retr, QUERIES, k=k)
    assert enc.query_flags and not any(enc.query_flags)  # raw problem, no query prompt (the reference)
    S = np.stack([enc.vec(skill_text(s)) for s in bank.skills])
    M = np.stack([enc.vec(mistake_text(m)) for m in bank.mistakes])
    for q, pool in zip(QUERIES, pools):
        sims_s, sims_m = S @ enc.vec(q), M @ enc.vec(q)  # every similarity, computed here
        want_s = [bank.skills[i]["skill_id"] for i in np.argsort(-sims_s, kind="stable")[:k]]
        want_m = [bank.mistakes[i]["mistake_id"] for i in np.argsort(-sims_m, kind="stable")[:k]]
        assert [t.skill["skill_id"] for t in pool] == want_s[: len(pool)]
        assert [t.mistake["mistake_id"] for t in pool] == want_m[: len(pool)]
        assert len(pool) == min(k, len(bank.skills), len(bank.mistakes))
        pair = np.array([(sims_s[np.argsort(-sims_s, kind="stable")[j]] + sims_m[np.argsort(-sims_m, kind="stable")[j]]) / 2
                         for j in range(len(pool))])
        w = np.exp(pair - pair.max()) / np.exp(pair - pair.max()).sum()
        assert [t.weight for t in pool] == pytest.approx(w.tolist(), abs=1e-6)
    enc2 = _FakeEncoder()
    retrieve_many(EmbeddingRetriever(bank, enc2, query_prompt=True), QUERIES[:2], k=k)
    assert enc2.query_flags == [True]


# ---------------------------------------------------------------------------------------------- loop sampler


@pytest.mark.parametrize("N,P,steps", [(30, 4, 200), (7, 7, 20), (10, 3, 100), (5, 4, 50)])
def test_step_problems_never_repeats_a_problem_within_a_step(N, P, steps):
    from stages.loop import step_problems

    pool = pl.DataFrame({"id": [f"p{i:02d}" for i in range(N)], "problem": ["x"] * N, "answer": ["1"] * N})
    counts = {f"p{i:02d}": 0 for i in range(N)}
    for n in range(1, steps + 1):
        ids = step_problems(pool, n, P, seed=3)["id"].to_list()
        assert len(ids) == P and len(set(ids)) == P, f"step {n}: {ids}"
        for i in ids:
            counts[i] += 1
    # every problem comes about once per epoch: counts differ by at most 2 after any number of steps
    assert max(counts.values()) - min(counts.values()) <= 2
    # steps inside the first epoch are plain slices of its permutation (written independently here)
    perm = np.random.default_rng([3, 7, 0]).permutation(N)
    assert step_problems(pool, 1, P, seed=3)["id"].to_list() == [f"p{i:02d}" for i in perm[:P]]


def test_step_problems_refuses_more_prompts_than_problems():
    from stages.engine.errors import InputError
    from stages.loop import step_problems

    pool = pl.DataFrame({"id": ["a", "b"], "problem": ["x", "y"], "answer": ["1", "2"]})
    with pytest.raises(InputError, match="exceeds the training pool"):
        step_problems(pool, 1, 3, seed=0)


def test_lm_head_runs_in_fp32_under_bf16_autocast():
    """Training logits: the LM head on the scored positions in fp32 even under bf16 autocast."""
    import torch

    from stages.engine.scoring import head_logits_fp32

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 300, bias=False)
    h = torch.randn(7, 64)
    want = h.double() @ head.weight.double().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, plain = head_logits_fp32(head, h), head(h)
    assert got.dtype == torch.float32 and plain.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() < 1e-4 < (plain.double() - want).abs().max()
    head16 = torch.nn.Linear(64, 300, bias=False).to(torch.bfloat16)
    got16 = head_logits_fp32(head16, h)  # bf16 weights: upcast for the product
    assert got16.dtype == torch.float32
    assert (got16.double() - h.double() @ head16.weight.double().T).abs().max() < 1e-4
