"""Issue 24, a researcher's first hour: a dry run that checks, no silent demo defaults, options named one way
(old names keep working with a one-line notice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import DEMO_BANK, DEMO_PROBLEMS

RECIPE = """
[loop]
run_dir = "{run_dir}"
objective = "sgsd"
model = "{model}"
problems = "{problems}"
bank = "{bank}"
steps = 3
prompts_per_step = 2
eval_every = 2
device = "cpu"

[rollout]
max_new_tokens = 6

[score_teachers]
k = 2
retrieval = "lexical"

[train]
batch_size = 0

[eval]
protocol = "quick"
problems = ["{problems}"]
"""


def _app():
    from sgsd_cli.common import app
    from sgsd_cli.main import _register
    from stages.engine import config

    _register()
    config._NOTICED.clear()  # deprecation notices are once per process
    return app


def _recipe(tmp_path: Path, model, **kw) -> Path:
    p = tmp_path / "r.toml"
    v = {"run_dir": tmp_path / "run", "model": model, "problems": DEMO_PROBLEMS, "bank": DEMO_BANK, **kw}
    p.write_text(RECIPE.format(**v))
    return p


def test_loop_dry_run_resolves_and_checks_like_the_run(tmp_path, tiny_model_dir):
    app, run = _app(), CliRunner()
    cfg = _recipe(tmp_path, tiny_model_dir)
    r = run.invoke(app, ["loop", "--config", str(cfg), "--dry-run"])
    assert r.exit_code == 0, r.output
    resolved = json.loads(r.stdout)
    assert resolved["eval"]["n"] == 2 and resolved["eval"]["max_new_tokens"] == 512  # the protocol's values, not null
    assert resolved["loop"]["backend"] == "auto" and resolved["train"]["teacher_mode"] == "live"
    n_demo = sum(1 for line in DEMO_PROBLEMS.read_text().splitlines() if line.strip())
    assert f"training pool: {DEMO_PROBLEMS} = {DEMO_PROBLEMS} ({n_demo} problems)" in r.stderr
    assert "steps: 3 x 2 prompts x 1 sample(s) = 6 rollouts" in r.stderr
    assert "skill bank: " in r.stderr and "backend: auto -> hf on cpu" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing ran, nothing written
    # --print-config is the same check and output, under its deprecated name
    r2 = run.invoke(app, ["loop", "--config", str(cfg), "--print-config"])
    assert r2.exit_code == 0 and json.loads(r2.stdout) == resolved
    assert "note: sgsd loop --print-config is deprecated" in r2.stderr


@pytest.mark.parametrize("change,message", [
    (("[train]\n", "[train]\nlearning_rate = 1e-5\n"), "unknown option 'train.learning_rate'"),
    (("prompts_per_step = 2", "prompt_per_step = 2"), "unknown option 'loop.prompt_per_step'"),
    (("bank = ", "bank = \"nowhere.json\"\n#"), "skill bank not found"),
    (("problems = ", "problems = \"nowhere.jsonl\"\n#"), "nowhere.jsonl"),
    (("model = ", "model = \"/no/such/model\"\n#"), "model path does not exist"),
    (("prompts_per_step = 2", "prompts_per_step = 5000"), "exceeds the training pool"),
])
def test_loop_dry_run_refuses_what_the_run_refuses(tmp_path, tiny_model_dir, change, message):
    cfg = _recipe(tmp_path, tiny_model_dir)
    cfg.write_text(cfg.read_text().replace(*change, 1))
    r = CliRunner().invoke(_app(), ["loop", "--config", str(cfg), "--dry-run"])
    assert r.exit_code == 2, r.output
    assert message in r.stderr and r.stderr.count("error:") == 1 and "Traceback" not in r.output


def test_loop_dry_run_refuses_a_run_dir_of_another_config(tmp_path, tiny_model_dir):
    cfg = _recipe(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "loop_config.json").write_text(json.dumps({"loop": {"steps": 3, "seed": 9}}))
    r = CliRunner().invoke(_app(), ["loop", "--config", str(cfg), "--dry-run"])
    assert r.exit_code == 2 and "started with another config" in r.stderr


def test_no_silent_demo_inputs(tmp_path, tiny_model_dir):
    """rollout needs --problems, score-teachers --bank, an sgsd loop its bank; one backend default (auto)."""
    from stages.eval import EvalConfig
    from stages.loop import LoopConfig
    from stages.rollout import RolloutConfig

    app, run = _app(), CliRunner()
    r = run.invoke(app, ["rollout", "--run-dir", str(tmp_path / "r"), "--model", str(tiny_model_dir), "--device", "cpu"])
    assert r.exit_code == 2 and "--problems is required" in r.stderr
    cfg = _recipe(tmp_path, tiny_model_dir)
    cfg.write_text(cfg.read_text().replace(f'bank = "{DEMO_BANK}"', ""))
    r = run.invoke(app, ["loop", "--config", str(cfg), "--dry-run"])
    assert r.exit_code == 2 and "loop.bank is required for sgsd" in r.stderr
    assert LoopConfig().backend == RolloutConfig(model="m").backend == EvalConfig(model="m").backend == "auto"
    assert RolloutConfig(model="m").problems == "" and LoopConfig().bank == ""


def test_score_teachers_requires_a_bank(tmp_path):
    import polars as pl

    from stages import score_teachers
    from stages.engine.errors import InputError

    ro = tmp_path / "rollout.parquet"
    pl.DataFrame({"rollout_id": ["a#0"], "problem_id": ["a"], "problem": ["p"], "answer": ["1"], "prompt": ["p"],
                  "prompt_ids": [[1]], "completion": ["c"], "completion_ids": [[2]], "sample_logprobs": [[-0.1]],
                  "finish_reason": ["stop"], "model": ["m"], "policy_step": [0], "temperature": [1.0],
                  "top_p": [1.0], "top_k": [0], "thinking": [False], "backend": ["hf"]}).write_parquet(ro)
    with pytest.raises(InputError, match="--bank is required"):
        score_teachers.run(score_teachers.ScoreTeachersConfig(model="m"), tmp_path)


def _dry(app, command, *args):
    r = CliRunner().invoke(app, [command, "--run-dir", "unused", "--model", "m", "--dry-run", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout), r.stderr


def test_renamed_options_keep_their_old_names_with_one_notice(tmp_path):
    app = _app()
    got, err = _dry(app, "eval", "--bench", "aime24", "--verify-timeout", "3")
    assert got["verify_timeout_s"] == 3.0 and err == ""
    got, err = _dry(app, "eval", "--bench", "aime24", "--grade-timeout", "4")
    assert got["verify_timeout_s"] == 4.0
    assert err.strip() == "note: --grade-timeout is deprecated and will be removed; use --verify-timeout"
    got, err = _dry(app, "eval", "--bench", "aime24", "--grade-timeout", "4", "--verify-timeout", "6")
    assert got["verify_timeout_s"] == 6.0  # the new name wins
    got, _ = _dry(app, "eval", "--bench", "aime24", "--set", "grade_timeout_s=7")  # old TOML / --set key
    assert got["verify_timeout_s"] == 7.0
    for command in ("rollout", "eval"):
        got, err = _dry(app, command, "--bench", "aime24", "--decode-batch", "5") if command == "eval" else \
            _dry(app, command, "--decode-batch", "5")
        assert got["batch_size"] == 5 and err == ""
        _app()
        got, err = _dry(app, command, "--batch-size", "6")
        assert got["batch_size"] == 6 and "--batch-size is deprecated" in err and "--decode-batch" in err
    r = CliRunner().invoke(app, ["build-index", "--run-dir", "x", "--bank", "b.json", "--encode-batch", "3", "--dry-run"])
    assert r.exit_code == 0 and json.loads(r.stdout)["batch_size"] == 3
    r = CliRunner().invoke(app, ["rollout", "--run-dir", str(tmp_path / "r"), "--model", "m", "--batch-size", "0"])
    assert r.exit_code == 2 and "--decode-batch must be >= 1" in r.stderr
    # train: --precision; --dtype is its former name
    r = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "--precision" in r.output and "--dtype" not in r.output and "--batch-size" in r.output


def test_sft_takes_config_set_and_dry_run(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('[sft]\nsteps = 7\nlr = 0.01\n')
    app = _app()
    r = CliRunner().invoke(app, ["sft", "--run-dir", str(tmp_path / "s"), "--model", "m", "--data", "d.jsonl",
                                 "--config", str(toml), "--set", "lr=0.02", "--dry-run"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["steps"], got["lr"], got["model"]) == (7, 0.02, "m") and not (tmp_path / "s").exists()
    r = CliRunner().invoke(app, ["sft", "--run-dir", str(tmp_path / "s"), "--model", "m", "--data", "d", "--lr", "0"])
    assert r.exit_code == 2 and "--lr must be > 0" in r.stderr


def test_help_texts_say_what_the_options_do():
    app = _app()
    r = CliRunner().invoke(app, ["score-teachers", "--help"], env={"COLUMNS": "250"})
    text = " ".join(r.output.split())
    assert "K = min of the two counts teachers" not in text and "teacher j pairs the j-th skill" in text
    assert "Seed of --retrieval random" in text and "sampling, shuffling" not in text


def test_step_problems_refuses_step_zero(tmp_path):
    r = CliRunner().invoke(_app(), ["step-problems", "--pool", str(DEMO_PROBLEMS), "--step", "0", "--per-step", "2",
                                    "--out", str(tmp_path / "p.parquet")])
    assert r.exit_code == 2 and "--step must be >= 1" in r.stderr and not (tmp_path / "p.parquet").exists()
    r = CliRunner().invoke(_app(), ["step-problems", "--pool", str(DEMO_PROBLEMS), "--step", "1", "--per-step", "2",
                                    "--out", str(tmp_path / "p.parquet")])
    assert r.exit_code == 0 and (tmp_path / "p.parquet").exists()


def test_paper_encoder_without_sentence_transformers_is_refused(monkeypatch):
    import sys

    from stages.engine.errors import InputError
    from stages.engine.skills import encoders

    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    encoders.load_encoder.cache_clear()
    with pytest.raises(InputError, match="needs sentence-transformers"):
        encoders.load_encoder(encoders.DEFAULT_ENCODER, "cpu", "auto")
    encoders.load_encoder.cache_clear()


def test_readme_gpu_section_and_the_pinned_cuda_extra():
    import tomllib

    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("vllm==") for d in extras["cuda"]) and any("sentence-transformers" in d for d in extras["cuda"])
    readme = (root / "README.md").read_text()
    assert readme.index("## Two commands on a fresh machine") < readme.index("## The paper's recipe on GPUs")
    sec = readme.split("## The paper's recipe on GPUs", 1)[1].split("\n## ", 1)[0]
    for needle in ('".[cuda]"', "SGSD_DATA_DIR", "DAPO-Math-17k", "MATH train levels 3-5", "--nproc_per_node 4",
                   "Untested on CUDA", "hub:train", "--dry-run", "mean pooling"):
        assert needle in sec, needle
