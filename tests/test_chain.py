"""The chain rollout -> score-teachers -> polarize through the CLI, resume, and bad input (exit 2, one line)."""

import json
import os
import subprocess
from pathlib import Path

import polars as pl

from stages.engine.tableio import read_table
import pytest
from typer.testing import CliRunner

from conftest import DEMO_BANK, DEMO_PROBLEMS, REPO

runner = CliRunner()


def sgsd(*args):
    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    _register()
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


CPU = ["--device", "cpu", "--dtype", "fp32"]


def _chain(run, model, problems=str(DEMO_PROBLEMS), bank=DEMO_BANK, limit=4):
    r = sgsd("rollout", "--run-dir", run, "--model", model, "--problems", problems, "--limit", limit,
             "--max-new-tokens", 12, "--backend", "hf", *CPU)
    assert r.exit_code == 0, r.output
    r = sgsd("score-teachers", "--retrieval", "lexical", "--run-dir", run, "--model", model, "--bank", bank, "--k", 3, *CPU)
    assert r.exit_code == 0, r.output
    r = sgsd("polarize", "--run-dir", run)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def chain_run(tiny_model_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("chain") / "step_0000"
    _chain(run, tiny_model_dir)
    return run


def test_help_lists_every_stage():
    r = sgsd("--help")
    for cmd in ["mine-skills", "build-index", "rollout", "score-teachers", "polarize", "train", "eval", "loop"]:
        assert cmd in r.output


def test_chain_tables(chain_run, tiny):
    _, tok, _ = tiny
    ro = pl.read_parquet(chain_run / "rollout.parquet")
    assert ro.height == 4 and ro["rollout_id"].n_unique() == 4
    assert (ro["completion_ids"].list.len() == ro["sample_logprobs"].list.len()).all()
    assert set(ro["finish_reason"]) <= {"stop", "length"}
    st = pl.read_parquet(chain_run / "score_teachers.parquet")
    assert st.height == 4 * 3
    assert st.group_by("rollout_id").agg(pl.col("weight").sum())["weight"].to_list() == pytest.approx([1.0] * 4)
    # one student forward per rollout: identical student log-probs across its teachers
    assert st.group_by("rollout_id").agg(pl.col("student_logprobs").n_unique())["student_logprobs"].to_list() == [1] * 4
    pol = pl.read_parquet(chain_run / "polarize.parquet")
    assert pol.height == st.height
    assert set(pol["category"]) <= {"helpful", "warning", "misleading", "over_suppressive", "neutral"}
    assert ((pol["polarity"] == pol["outcome"] * pol["stance"])).all()
    per = pl.read_parquet(chain_run / "polarize_rollouts.parquet")
    assert per.height == 4
    for name in ("rollout", "score_teachers", "polarize"):
        m = json.loads((chain_run / f"{name}.manifest.json").read_text())
        assert m["complete"] and m["rows"] > 0 and "transformers" in m["versions"]
    _check_polarity_from_scores(ro, st, pol, tok)


def _check_polarity_from_scores(ro, st, pol, tok):
    """Support, stance and polarity recomputed from score-teachers' log-probs, the token mask of the rollout's
    tokens and a direct math-verify call (not from polarize's own columns)."""
    import math_verify

    from stages.engine.objectives.sgsd import maskable_token_ids, token_mask

    special, newline = maskable_token_ids(tok)
    rolls = {r["rollout_id"]: r for r in ro.to_dicts()}
    got = {(r["rollout_id"], r["teacher_rank"]): r for r in pol.to_dicts()}
    for r in st.to_dicts():
        ro_r = rolls[r["rollout_id"]]
        m = token_mask(ro_r["completion_ids"], special, newline)
        n = max(1, sum(m))
        a = sum(max(-3.0, min(3.0, t - s)) for t, s, keep in zip(r["teacher_logprobs"], r["student_logprobs"], m) if keep) / n
        sigma = (1 if a > 0 else -1) if abs(a) > 0.05 else 0
        gold = math_verify.parse("$" + ro_r["answer"] + "$")
        pred = math_verify.parse(ro_r["completion"])
        outcome = 1 if (pred and math_verify.verify(gold, pred)) else -1
        row = got[(r["rollout_id"], r["teacher_rank"])]
        assert row["token_mask"] == m
        assert row["support"] == pytest.approx(a, abs=1e-9)
        assert (row["outcome"], row["stance"], row["polarity"]) == (outcome, sigma, outcome * sigma)


def test_rerun_skips_and_changed_config_is_refused(chain_run, tiny_model_dir):
    before = (chain_run / "rollout.parquet").stat().st_mtime_ns
    r = sgsd("rollout", "--run-dir", chain_run, "--model", tiny_model_dir, "--problems", str(DEMO_PROBLEMS), "--limit", 4,
             "--max-new-tokens", 12, "--backend", "hf", *CPU)
    assert r.exit_code == 0 and (chain_run / "rollout.parquet").stat().st_mtime_ns == before
    r = sgsd("rollout", "--run-dir", chain_run, "--model", tiny_model_dir, "--problems", str(DEMO_PROBLEMS), "--limit", 4,
             "--max-new-tokens", 13, "--backend", "hf", *CPU)
    assert r.exit_code == 2 and "pass --force" in r.output
    assert (chain_run / "rollout.parquet").stat().st_mtime_ns == before


def test_shards_write_part_files_read_as_directory(tiny_model_dir, tmp_path):
    run = tmp_path / "sharded"
    for i in range(2):
        r = sgsd("rollout", "--run-dir", run, "--model", tiny_model_dir, "--problems", DEMO_PROBLEMS, "--limit", 3,
                 "--max-new-tokens", 6, "--backend", "hf", "--shard", f"{i}/2", *CPU)
        assert r.exit_code == 0, r.output
    parts = sorted(p.name for p in (run / "rollout").glob("*.parquet"))
    assert parts == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"]
    # contiguous blocks (1 + 2 of 3 problems), sampled per problem: the parts in order are the unsharded table
    assert [pl.read_parquet(run / "rollout" / p).height for p in parts] == [1, 2]
    one = tmp_path / "one"
    r = sgsd("rollout", "--run-dir", one, "--model", tiny_model_dir, "--problems", DEMO_PROBLEMS, "--limit", 3,
             "--max-new-tokens", 6, "--backend", "hf", *CPU)
    assert r.exit_code == 0, r.output
    whole = pl.read_parquet(one / "rollout.parquet")
    joined = read_table(run / "rollout")
    assert joined["rollout_id"].to_list() == whole["rollout_id"].to_list()
    assert joined["completion_ids"].to_list() == whole["completion_ids"].to_list()
    assert len(set(map(tuple, whole["completion_ids"].to_list()))) == 3  # the random model draws three completions
    r = sgsd("score-teachers", "--retrieval", "lexical", "--run-dir", run, "--model", tiny_model_dir, "--k", 2,
             "--bank", DEMO_BANK, *CPU)
    assert r.exit_code == 0, r.output
    assert pl.read_parquet(run / "score_teachers.parquet")["rollout_id"].n_unique() == 3


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}


def _one_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    text = (r.stderr if r.stderr else r.output).strip()
    assert len(text.splitlines()) == 1, text
    assert text.startswith("error:") and "Traceback" not in r.output
    for n in needles:
        assert n in text, text


def test_bad_inputs_exit_2_one_line_outputs_untouched(chain_run, tiny_model_dir, tmp_path):
    snap = _snapshot(chain_run)
    # problems file without an answer column
    p = tmp_path / "noanswer.jsonl"
    p.write_text('{"id": "a", "problem": "1+1"}\n')
    _one_error_line(sgsd("rollout", "--run-dir", chain_run, "--model", tiny_model_dir, "--problems", p, "--force", *CPU),
                    str(p), "answer")
    # wrong type
    p2 = tmp_path / "wrongtype.parquet"
    pl.DataFrame({"id": ["a"], "problem": [3], "answer": ["1"]}).write_parquet(p2)
    _one_error_line(sgsd("rollout", "--run-dir", chain_run, "--model", tiny_model_dir, "--problems", p2, "--force", *CPU),
                    str(p2), "problem")
    # empty table
    p3 = tmp_path / "empty.jsonl"
    p3.write_text("")
    _one_error_line(sgsd("rollout", "--run-dir", chain_run, "--model", tiny_model_dir, "--problems", p3, "--force", *CPU),
                    str(p3), "empty")
    # corrupt parquet as the rollout table
    bad = tmp_path / "corrupt.parquet"
    bad.write_bytes(b"PAR1\x00\x01garbage")
    _one_error_line(sgsd("score-teachers", "--retrieval", "lexical", "--run-dir", chain_run, "--model", tiny_model_dir, "--rollouts", bad, "--force", *CPU),
                    str(bad), "not a readable table")
    # skill bank that is not valid JSON
    bank = tmp_path / "bank.json"
    bank.write_text('{"general_skills": [')
    _one_error_line(sgsd("score-teachers", "--retrieval", "lexical", "--run-dir", chain_run, "--model", tiny_model_dir, "--bank", bank, "--force", *CPU),
                    str(bank), "not valid JSON")
    # unknown model path
    _one_error_line(sgsd("rollout", "--run-dir", chain_run, "--model", tmp_path / "no-such-model", "--problems",
                         str(DEMO_PROBLEMS), "--force", *CPU),
                    "no-such-model", "does not exist")
    assert _snapshot(chain_run) == snap


def test_smoke_script_on_shared_train_and_paper_bank(shared_data, tmp_path):
    """scripts/smoke.sh end to end on ../shared/data/train.jsonl with the Qwen3-1.7B skill bank."""
    env = dict(os.environ, SGSD_SMOKE_PROBLEMS=str(shared_data / "train.jsonl"),
               SGSD_SMOKE_BANK=str(shared_data / "skill_banks" / "sgsd_qwen3_1.7b.json"),
               SGSD_SMOKE_LIMIT="6", SGSD_SMOKE_MAX_NEW_TOKENS="16")
    run = tmp_path / "smoke"
    res = subprocess.run(["bash", str(REPO / "scripts" / "smoke.sh"), str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for t in ["step_0001/rollout.parquet", "step_0001/score_teachers.parquet", "step_0001/polarize.parquet",
              "step_0001/train.parquet", "step_0002/rollout.parquet"]:
        assert (run / t).exists(), t
    assert pl.read_parquet(run / "step_0001" / "rollout.parquet")["problem_id"].to_list()[0] == "math_train-0000"
    assert set(pl.read_parquet(run / "step_0001" / "score_teachers.parquet")["skill_id"]) <= {
        s["skill_id"] for s in json.loads((shared_data / "skill_banks" / "sgsd_qwen3_1.7b.json").read_text())["general_skills"]}
    assert pl.read_parquet(run / "step_0002" / "rollout.parquet")["policy_step"].to_list()[0] == 1
    # it ends with what to run next, and the report finds the stage-by-stage steps
    tail = res.stdout.strip().splitlines()[-3:]
    assert tail[0] == "look at it next:" and f"report {run}" in tail[1] and "inspect" in tail[2] and "--worst" in tail[2]
    from stages import report

    r = report.load_run(run)
    assert r["kind"] == "steps" and r["metrics"]["step"].to_list() == [1]
