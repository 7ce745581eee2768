"""`sgsd train` on the tiny model: direction of the SGSD update, the three objectives, CLI, bad input.

``make_run`` builds small consistent rollout / score_teachers / polarize tables (the lead's schemas) from
the tiny model, so the trainer is tested without the rollout and scoring stages; other test modules
import it.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from stages.engine.atomic import write_parquet
from stages.engine.prompts import chat_prompt_ids, student_prompt
from stages.engine.scoring import Segment, score_segments
from stages.engine.objectives.sgsd import category


def make_run(run_dir: Path, tiny, *, n_problems: int = 4, samples: int = 1, K: int = 2, T: int = 8,
             rho=None, teacher_shift: float | None = None, seed: int = 0, correct=None) -> Path:
    """Write rollout.parquet, score_teachers.parquet, polarize.parquet (+ polarize_rollouts) into run_dir.

    ``rho(i, k)`` gives teacher k's polarity on rollout i (default: alternating +1 / -1 / 0);
    ``teacher_shift``: stored teacher log-probs = student + shift (else the tiny model's own scores of
    the teacher prompt); ``correct(i)``: the verifier outcome.
    """
    model, tok, _ = tiny
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    special = set(tok.all_special_ids)
    vocab = [i for i in range(len(tok)) if i not in special and tok.decode([i]).strip()]
    rho = rho or (lambda i, k: (1, -1, 0)[(i + k) % 3])
    correct = correct or (lambda i: i % 2 == 0)
    roll, score, pol, per_roll = [], [], [], []
    for p in range(n_problems):
        problem = f"Compute ${p + 2} + {p + 5}$."
        answer = str(2 * p + 7)
        prompt_ids = chat_prompt_ids(tok, student_prompt(problem), False)
        for s in range(samples):
            i = p * samples + s
            rid = f"demo-{p:03d}#{s}"
            comp = [vocab[j] for j in torch.randint(len(vocab), (T - (i % 3),), generator=g).tolist()]
            with torch.no_grad():
                slp = score_segments(model, [Segment.of(prompt_ids, comp)])[0].tolist()
            ok = bool(correct(i))
            roll.append({"rollout_id": rid, "problem_id": f"demo-{p:03d}", "sample_index": s, "problem": problem,
                         "answer": answer, "prompt": tok.decode(prompt_ids), "prompt_ids": prompt_ids,
                         "completion": tok.decode(comp) + (f" \\boxed{{{answer}}}" if ok else " \\boxed{0}"),
                         "completion_ids": comp, "sample_logprobs": slp, "finish_reason": "stop", "model": "tiny",
                         "policy_step": 0, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "thinking": False,
                         "backend": "hf"})
            weights = torch.softmax(torch.arange(K, dtype=torch.float64) * -0.5, 0).tolist()
            for k in range(K):
                tp = chat_prompt_ids(tok, f"Hint {k}: add carefully.\n\n" + student_prompt(problem), False)
                if teacher_shift is None:
                    with torch.no_grad():
                        tlp = score_segments(model, [Segment.of(tp, comp)])[0].tolist()
                else:
                    tlp = [x + teacher_shift for x in slp]
                r = int(rho(i, k))
                o = 1 if ok else -1
                sigma = r * o
                score.append({"rollout_id": rid, "problem_id": f"demo-{p:03d}", "teacher_rank": k,
                              "skill_id": f"s{k}", "mistake_id": f"m{k}", "skill_score": 0.5, "mistake_score": 0.4,
                              "weight": weights[k], "teacher_prompt": tok.decode(tp), "teacher_prompt_ids": tp,
                              "student_logprobs": slp, "teacher_logprobs": tlp, "scoring_temperature": 1.0,
                              "retrieval_mode": "lexical", "bank_version": "bank-v0"})
                pol.append({"rollout_id": rid, "teacher_rank": k, "weight": weights[k], "correct": ok, "outcome": o,
                            "support": 0.1 * sigma, "stance": sigma, "polarity": r, "category": category(o, sigma),
                            "token_mask": [True] * len(comp), "n_mask": len(comp), "clipped_frac": 0.0})
            per_roll.append({"rollout_id": rid, "correct": ok, "status": "ok", "pred": answer if ok else "0"})
    write_parquet(pl.DataFrame(roll), run_dir / "rollout.parquet")
    write_parquet(pl.DataFrame(score), run_dir / "score_teachers.parquet")
    write_parquet(pl.DataFrame(pol), run_dir / "polarize.parquet")
    write_parquet(pl.DataFrame(per_roll), run_dir / "polarize_rollouts.parquet")
    return run_dir


def train_cfg(model_dir, **kw):
    from stages.train import TrainConfig

    base = dict(model=str(model_dir), device="cpu", precision="fp32", lr=1e-3, max_grad_norm=1.0, batch_size=4,
                micro_batch_size=2, steps=2, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def student_logprobs(model_dir_or_model, run_dir):
    """Student log-probs of every rollout of a run directory under a model folder (or loaded model)."""
    from stages.engine.models import load_model

    model = load_model(str(model_dir_or_model), device="cpu", dtype="fp32")[0] if isinstance(model_dir_or_model, (str, Path)) else model_dir_or_model
    rt = pl.read_parquet(Path(run_dir) / "rollout.parquet").sort("rollout_id")
    segs = [Segment.of(p, c) for p, c in zip(rt["prompt_ids"].to_list(), rt["completion_ids"].to_list())]
    with torch.no_grad():
        return dict(zip(rt["rollout_id"].to_list(), score_segments(model, segs)))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------


def test_sgsd_direction_rho_plus_raises_rho_minus_lowers(tmp_path, tiny, tiny_model_dir):
    """Teacher 1 nat above the student everywhere: rho=+1 pulls the student up, rho=-1 pushes it down."""
    from stages import train

    results = {}
    for sign in (1, -1):
        run = make_run(tmp_path / f"rho{sign}", tiny, n_problems=2, K=2, T=6, rho=lambda i, k, s=sign: s,
                       teacher_shift=1.0)
        before = student_logprobs(tiny_model_dir, run)
        train.run(train_cfg(tiny_model_dir, objective="sgsd", teacher_mode="fixed", steps=3, lr=1e-3), run)
        after = student_logprobs(run / "checkpoint", run)
        results[sign] = [float((after[r] - before[r]).mean()) for r in before]
    assert all(d > 0 for d in results[1]), results
    assert all(d < 0 for d in results[-1]), results


def test_sgsd_live_teacher_trains_and_writes_metrics_and_checkpoint(tmp_path, tiny, tiny_model_dir):
    from stages.engine import checkpoint as ckpt
    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=4, K=3)
    out = train.run(train_cfg(tiny_model_dir, objective="sgsd", steps=2), run)
    m = pl.read_parquet(out)
    assert m.height == 2 and m["policy_step"].to_list() == [1, 2]
    for col in ("loss", "grad_norm", "lr", "tokens_per_s", "frac_helpful", "frac_warning", "mean_support", "wall_s"):
        assert col in m.columns
    assert all(torch.isfinite(torch.tensor(m["loss"].to_list())))
    assert m["grad_norm"].min() > 0
    meta = json.loads((run / "checkpoint" / "sgsd_checkpoint.json").read_text())
    assert meta["bank_version"] == "bank-v0" and meta["policy_step"] == 2 and meta["teacher_mode"] == "live"
    st = ckpt.validate(run / "checkpoint")
    assert st["local_step"] == 2 and st["sampler"]["position"] == 2
    man = json.loads((run / "train.manifest.json").read_text())
    assert man["resolved_config"]["objective"] == "sgsd" and man["complete"]
    # up to date: a rerun is skipped without touching anything
    mtime = (run / "checkpoint" / "checksums.json").stat().st_mtime
    train.run(train_cfg(tiny_model_dir, objective="sgsd", steps=2), run)
    assert (run / "checkpoint" / "checksums.json").stat().st_mtime == mtime


def test_live_teacher_matches_stored_scores_at_step_zero(tmp_path, tiny, tiny_model_dir):
    """With the initial weights, live teacher log-probs equal the stored ones: first-step losses agree."""
    from stages import train

    run_a = make_run(tmp_path / "a", tiny, n_problems=3, K=2)
    run_b = make_run(tmp_path / "b", tiny, n_problems=3, K=2)
    la = pl.read_parquet(train.run(train_cfg(tiny_model_dir, teacher_mode="live", steps=1, batch_size=3), run_a))
    lb = pl.read_parquet(train.run(train_cfg(tiny_model_dir, teacher_mode="fixed", steps=1, batch_size=3), run_b))
    assert la["loss"][0] == pytest.approx(lb["loss"][0], abs=1e-5)
    assert la["grad_norm"][0] == pytest.approx(lb["grad_norm"][0], rel=1e-4)


def test_gradient_checkpointing_gives_the_same_step(tmp_path, tiny, tiny_model_dir):
    from stages import train

    a = make_run(tmp_path / "a", tiny, n_problems=2, K=2)
    b = make_run(tmp_path / "b", tiny, n_problems=2, K=2)
    ma = pl.read_parquet(train.run(train_cfg(tiny_model_dir, steps=2, batch_size=2), a))
    mb = pl.read_parquet(train.run(train_cfg(tiny_model_dir, steps=2, batch_size=2, gradient_checkpointing=True), b))
    assert mb["loss"].to_list() == pytest.approx(ma["loss"].to_list(), abs=1e-6)
    assert mb["grad_norm"].to_list() == pytest.approx(ma["grad_norm"].to_list(), rel=1e-5)


def test_ema_teacher_and_cosine_schedule(tmp_path, tiny, tiny_model_dir):
    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=4, K=2)
    out = train.run(train_cfg(tiny_model_dir, teacher_mode="ema", ema_decay=0.5, steps=3, batch_size=2,
                              lr_schedule="cosine", warmup_steps=1, lr=1e-3), run)
    m = pl.read_parquet(out)
    # warmup 1 step at full lr, then cosine over 3 steps: 1e-3, cos(pi*1/2)... -> 1e-3, 5e-4
    assert m["lr"].to_list()[:2] == pytest.approx([1e-3, 1e-3])
    assert m["lr"][2] == pytest.approx(5e-4, rel=1e-6)
    assert (run / "checkpoint" / "ema.pt").exists()


def test_opsd_objective_trains_with_fixed_teacher(tmp_path, tiny, tiny_model_dir):
    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=3)
    out = train.run(train_cfg(tiny_model_dir, objective="opsd", steps=2, batch_size=3, kl_chunk=4), run)
    m = pl.read_parquet(out)
    assert m.height == 2 and "kl_per_token" in m.columns
    assert m["loss"][0] > 0  # the gold-answer prompt changes the teacher distribution
    assert json.loads((run / "checkpoint" / "sgsd_checkpoint.json").read_text())["teacher_mode"] == "fixed"


def test_opsd_step_one_loss_equals_direct_kl(tmp_path, tiny, tiny_model_dir):
    """Loss of the first OPSD step = mean over tokens of the clipped KL computed from full logits."""
    from stages import train
    from stages.engine.objectives.opsd import clipped_forward_kl
    from stages.engine.prompts import opsd_teacher_prompt

    model, tok, _ = tiny
    run = make_run(tmp_path / "run", tiny, n_problems=2)
    m = pl.read_parquet(train.run(train_cfg(tiny_model_dir, objective="opsd", steps=1, batch_size=2), run))
    rt = pl.read_parquet(run / "rollout.parquet")
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rt.to_dicts():
            tp = chat_prompt_ids(tok, opsd_teacher_prompt(r["problem"], r["answer"]), True)  # teacher_thinking "on"
            c = r["completion_ids"]
            t_logits = model(input_ids=torch.tensor([tp + c])).logits[0, len(tp) - 1 : len(tp) - 1 + len(c)]
            s_logits = model(input_ids=torch.tensor([r["prompt_ids"] + c])).logits[0, len(r["prompt_ids"]) - 1 : len(r["prompt_ids"]) - 1 + len(c)]
            total += float(clipped_forward_kl(t_logits, s_logits, clip=0.05).sum())
            n += len(c)
    assert m["loss"][0] == pytest.approx(total / n, rel=1e-4)


def test_grpo_objective_uses_group_advantages(tmp_path, tiny, tiny_model_dir):
    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=2, samples=4, correct=lambda i: i % 4 in (0, 1))
    out = train.run(train_cfg(tiny_model_dir, objective="grpo", steps=2, batch_size=8, micro_batch_size=4,
                              num_iterations=2), run)
    m = pl.read_parquet(out)
    assert m.height == 2
    assert m["reward"][0] == pytest.approx(0.5)
    # on-policy first step: ratio 1, loss = -mean(A) over tokens, advantages sum to 0 per group
    assert m["ratio_mean"][0] == pytest.approx(1.0, abs=1e-4)
    assert m["clip_frac"][0] == 0.0
    # second iteration on the same batch: the ratio moved away from 1
    assert abs(m["ratio_mean"][1] - 1.0) > 1e-6


def test_grpo_recomputes_missing_sampling_logprobs(tmp_path, tiny, tiny_model_dir):
    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=2, samples=2)
    rt = pl.read_parquet(run / "rollout.parquet").with_columns(pl.lit([], dtype=pl.List(pl.Float64)).alias("sample_logprobs"))
    write_parquet(rt, run / "rollout.parquet")
    out = train.run(train_cfg(tiny_model_dir, objective="grpo", steps=1, batch_size=4, kl_beta=0.1), run)
    m = pl.read_parquet(out)
    assert m["ratio_mean"][0] == pytest.approx(1.0, abs=1e-4)
    assert m["kl"][0] == pytest.approx(0.0, abs=1e-6)
    assert (run / "train_old_logprobs.parquet").exists()


def test_cli_train_and_bad_input(tmp_path, tiny, tiny_model_dir):
    from typer.testing import CliRunner

    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    _register()

    run = make_run(tmp_path / "run", tiny, n_problems=2)
    r = CliRunner().invoke(app, ["train", "--objective", "sgsd", "--run-dir", str(run), "--model", str(tiny_model_dir),
                                 "--steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--device", "cpu",
                                 "--set", "lr=1e-4", "--set", "train.precision=fp32"])
    assert r.exit_code == 0, r.output
    man = json.loads((run / "train.manifest.json").read_text())
    assert man["resolved_config"]["lr"] == 1e-4 and man["grad_accum"] == 2
    # a loop recipe gives the model and objective; its train table the rest; CLI options and --set win
    rec = tmp_path / "recipe.toml"
    rec.write_text(f'[loop]\nmodel = "{tiny_model_dir}"\nobjective = "sgsd"\ndevice = "cpu"\n\n'
                   '[train]\nlr = 0.5\nsteps = 1\nbatch_size = 2\nprecision = "fp32"\nmicro_batch_size = 2\n')
    run2 = make_run(tmp_path / "run2", tiny, n_problems=2)
    r = CliRunner().invoke(app, ["train", "--run-dir", str(run2), "--config", str(rec), "--lr", "1e-4"])
    assert r.exit_code == 0, r.output
    man = json.loads((run2 / "train.manifest.json").read_text())
    assert man["resolved_config"]["lr"] == 1e-4 and man["resolved_config"]["model"] == str(tiny_model_dir)
    assert man["steps"] == 1
    # missing polarize table
    bad = tmp_path / "bad"
    bad.mkdir()
    write_parquet(pl.read_parquet(run / "rollout.parquet"), bad / "rollout.parquet")
    r = CliRunner().invoke(app, ["train", "--run-dir", str(bad), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert r.exit_code == 2 and "score_teachers.parquet" in r.output and "not found" in r.output
    # a wrong column type
    write_parquet(pl.read_parquet(run / "score_teachers.parquet"), bad / "score_teachers.parquet")
    write_parquet(pl.read_parquet(run / "polarize.parquet").with_columns(pl.col("polarity").cast(pl.String)),
                  bad / "polarize.parquet")
    r = CliRunner().invoke(app, ["train", "--run-dir", str(bad), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert r.exit_code == 2 and "polarity" in r.output
    # unknown --set key, unknown objective
    r = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--model", str(tiny_model_dir), "--set", "lrr=1"])
    assert r.exit_code == 2 and "unknown option 'train.lrr'" in r.output
    r = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--model", str(tiny_model_dir), "--set", "loop.steps=1"])
    assert r.exit_code == 2 and "train.* overrides only" in r.output
    r = CliRunner().invoke(app, ["train", "--run-dir", str(run), "--model", str(tiny_model_dir), "--objective", "ppo"])
    assert r.exit_code == 2 and "objective" in r.output


def test_mismatched_lengths_are_input_errors(tmp_path, tiny, tiny_model_dir):
    from stages import train
    from stages.engine.errors import InputError

    run = make_run(tmp_path / "run", tiny, n_problems=2)
    pt = pl.read_parquet(run / "polarize.parquet").with_columns(pl.col("token_mask").list.head(2))
    write_parquet(pt, run / "polarize.parquet")
    with pytest.raises(InputError, match="token_mask"):
        train.run(train_cfg(tiny_model_dir), run)
