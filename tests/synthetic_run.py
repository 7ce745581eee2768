"""Hand-made step and run directories with values chosen so tests can compute the expected numbers by hand
(tests/test_inspect.py, tests/test_report.py).  Each table has the columns SCHEMAS.md documents."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

BANK = {
    "general_skills": [
        {"skill_id": "s1", "title": "Use parity", "principle": "p", "when_to_apply": "w"},
        {"skill_id": "s2", "title": "Draw a picture", "principle": "p", "when_to_apply": "w"},
        {"skill_id": "s3", "title": "Never used", "principle": "p", "when_to_apply": "w"},
    ],
    "common_mistakes": [
        {"mistake_id": "m1", "description": "Sign slip", "why_it_happens": "y", "how_to_avoid": "h"},
        {"mistake_id": "m2", "description": "Off by one", "why_it_happens": "y", "how_to_avoid": "h"},
    ],
}

# two rollouts, two teachers each.  r1 correct (o=+1), r2 wrong (o=-1).
# student / teacher log-probs per completion token (3 tokens):
S = {"p1#0": [-1.0, -2.0, -0.5], "p2#0": [-1.0, -1.0, -1.0]}
T = {
    ("p1#0", 0): [0.0, -4.0, -0.5],   # Delta = [1, -2, 0]
    ("p1#0", 1): [2.0, 0.0, -0.5],    # Delta = [3, 2, 0]
    ("p2#0", 0): [-0.5, -0.5, -0.5],  # Delta = [0.5, 0.5, 0.5]
    ("p2#0", 1): [-1.0, -1.0, -1.0],  # Delta = [0, 0, 0]
}
W = {("p1#0", 0): 0.75, ("p1#0", 1): 0.25, ("p2#0", 0): 0.6, ("p2#0", 1): 0.4}
# stored polarize values (a_k, sigma, rho, category): chosen, not recomputed, so the tests check the tables are read
POL = {
    ("p1#0", 0): (0.5, 1, 1, "helpful"),
    ("p1#0", 1): (-0.2, -1, -1, "over_suppressive"),
    ("p2#0", 0): (1.0, 1, -1, "misleading"),
    ("p2#0", 1): (0.2, 1, -1, "misleading"),
}
MASK = {"p1#0": [True, True, False], "p2#0": [True, True, True]}
PAIRS = {("p1#0", 0): ("s1", "m1"), ("p1#0", 1): ("s2", "m2"), ("p2#0", 0): ("s1", "m2"), ("p2#0", 1): ("s2", "m1")}


def write_step(sd: Path, bank_path: Path, problem_text: str = "Is 7 < 9 & odd? <b>bold</b>") -> Path:
    sd.mkdir(parents=True, exist_ok=True)
    ro = pl.DataFrame({
        "rollout_id": ["p1#0", "p2#0"], "problem_id": ["p1", "p2"], "sample_index": [0, 0],
        "problem": [problem_text, "What is 2+2?"], "answer": ["yes", "4"],
        "prompt": ["<p1>", "<p2>"], "prompt_ids": [[1], [2]],
        "completion": ["a b c", "x y z"], "completion_ids": [[10, 11, 12], [13, 14, 15]],
        "sample_logprobs": [S["p1#0"], S["p2#0"]], "finish_reason": ["stop", "length"], "model": ["", ""],
        "policy_step": [0, 0], "temperature": [1.0, 1.0], "top_p": [1.0, 1.0], "top_k": [0, 0],
        "thinking": [False, False], "backend": ["hf", "hf"],
    })
    keys = sorted(T)
    sc = pl.DataFrame({
        "rollout_id": [k[0] for k in keys], "problem_id": [k[0].split("#")[0] for k in keys],
        "teacher_rank": [k[1] for k in keys], "skill_id": [PAIRS[k][0] for k in keys],
        "mistake_id": [PAIRS[k][1] for k in keys], "skill_score": [0.5] * 4, "mistake_score": [0.5] * 4,
        "weight": [W[k] for k in keys], "teacher_prompt": ["t"] * 4, "teacher_prompt_ids": [[1]] * 4,
        "student_logprobs": [S[k[0]] for k in keys], "teacher_logprobs": [T[k] for k in keys],
        "scoring_temperature": [1.0] * 4, "retrieval_mode": ["lexical"] * 4, "bank_version": ["x"] * 4,
    })
    correct = {"p1#0": True, "p2#0": False}
    po = pl.DataFrame({
        "rollout_id": [k[0] for k in keys], "teacher_rank": [k[1] for k in keys], "weight": [W[k] for k in keys],
        "correct": [correct[k[0]] for k in keys], "outcome": [1 if correct[k[0]] else -1 for k in keys],
        "support": [POL[k][0] for k in keys], "stance": [POL[k][1] for k in keys],
        "polarity": [POL[k][2] for k in keys], "category": [POL[k][3] for k in keys],
        "token_mask": [MASK[k[0]] for k in keys], "n_mask": [sum(MASK[k[0]]) for k in keys],
        "clipped_frac": [0.0] * 4,
    })
    gr = pl.DataFrame({"rollout_id": ["p1#0", "p2#0"], "correct": [True, False], "status": ["ok", "ok"],
                       "pred": ["yes", "5"]})
    ro.write_parquet(sd / "rollout.parquet")
    sc.write_parquet(sd / "score_teachers.parquet")
    po.write_parquet(sd / "polarize.parquet")
    gr.write_parquet(sd / "polarize_rollouts.parquet")
    (sd / "score_teachers.manifest.json").write_text(json.dumps({"inputs": {"bank": str(bank_path)}}))
    return sd


def write_bank(path: Path) -> Path:
    path.write_text(json.dumps(BANK))
    return path


def summary(bench_rows: list[dict]) -> pl.DataFrame:
    from stages.eval import SUMMARY_SCHEMA

    full = []
    for r in bench_rows:
        base = {k: None for k in SUMMARY_SCHEMA}
        base.update({"pass_at_1": 0.0, "pass_at_n": 0.0, "maj_at_n": 0.0, "format_rate": 1.0, "truncation_rate": 0.0,
                     "mean_tokens": 100.0, "timeout_rate": 0.0, "model": "m", "protocol": "quick", "source": "",
                     "samples": 0, "avg_at_n_se": 0.0})
        base.update(r)
        full.append(base)
    return pl.DataFrame(full, schema=SUMMARY_SCHEMA)
