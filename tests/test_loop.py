"""`sgsd loop` on the tiny model: the three objectives, periodic eval, online skill updates, metrics,
config files and overrides, run-directory protection.  (Kill-and-restart equality: tests/test_resume.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from conftest import DEMO_BANK, DEMO_PROBLEMS

BASE = """
[loop]
run_dir = "{run_dir}"
objective = "{objective}"
model = "{model}"
problems = "{problems}"
bank = "{bank}"
steps = {steps}
prompts_per_step = 2
device = "cpu"

[rollout]
n = {n}
max_new_tokens = 6
dtype = "fp32"

[score_teachers]
k = 2
dtype = "fp32"
retrieval = "lexical"

[polarize]
workers = 1

[train]
batch_size = 0
micro_batch_size = 2
lr = 1e-3
max_grad_norm = 1.0
precision = "fp32"
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path: Path, model: Path, objective="sgsd", steps=2, n=1, extra="", name="run") -> Path:
    p = tmp_path / f"{name}.toml"
    p.write_text(BASE.format(run_dir=tmp_path / name, objective=objective, model=model, problems=DEMO_PROBLEMS,
                             bank=DEMO_BANK, steps=steps, n=n) + extra)
    return p


def _run(cfg: Path, sets=()):
    from stages import loop
    from stages.engine.config import resolve

    sections, source = resolve(cfg, list(sets))
    return loop.run(sections, source=source)


def test_sgsd_loop_with_eval_and_skill_updates(tmp_path, tiny_model_dir):
    extra = """
[eval]
protocol = "quick"
problems = ["{problems}"]
limit = 2
n = 1
max_new_tokens = 4
grade_workers = 1

[update_skills]
success_threshold = 1.0

[update_skills.writer]
max_new_tokens = 8
batch_size = 4
""".format(problems=DEMO_PROBLEMS)
    cfg = _cfg(tmp_path, tiny_model_dir, steps=2, extra=extra)
    metrics = _run(cfg, ["loop.eval_every=2", "loop.skill_update_every=1"])
    run = tmp_path / "run"
    m = pl.read_parquet(metrics)
    assert m["step"].to_list() == [1, 2] and m["policy_step"].to_list() == [1, 2]
    for col in ("loss", "reward", "frac_helpful", "frac_warning", "frac_misleading", "frac_over_suppressive",
                "frac_neutral", "support_mean", "completion_len_mean", "grad_norm", "lr", "tokens_per_s",
                "wall_rollout_s", "wall_score_teachers_s", "wall_polarize_s", "wall_train_s"):
        assert col in m.columns, col
    assert m["wall_eval_s"].to_list()[1] is not None and (run / "step_0002" / "eval" / "summary.parquet").exists()
    # every step keeps its tables; the rollout of step 2 comes from step 1's checkpoint
    for n in (1, 2):
        for t in ("problems", "rollout", "score_teachers", "polarize", "polarize_rollouts", "train"):
            assert (run / f"step_{n:04d}" / f"{t}.parquet").exists()
    r2 = pl.read_parquet(run / "step_0002" / "rollout.parquet")
    assert r2["policy_step"].unique().to_list() == [1]
    assert r2["model"][0] == str(run / "step_0001" / "checkpoint")
    # skill updates: bank history started, one decision recorded per step
    assert (run / "bank" / "v0000.json").exists()
    for n in (1, 2):
        u = json.loads((run / f"step_{n:04d}" / "skills_update.json").read_text())
        assert u["decision"] in ("updated", "unchanged", "skipped")
    man = json.loads((run / "step_0002" / "score_teachers.manifest.json").read_text())
    assert "/bank/v" in man["config"]["bank"]
    ck = json.loads((run / "step_0002" / "checkpoint" / "sgsd_checkpoint.json").read_text())
    assert ck["bank_version"] and ck["policy_step"] == 2
    # the resolved config of every stage is recorded in each manifest
    tman = json.loads((run / "step_0001" / "train.manifest.json").read_text())
    assert tman["resolved_config"]["objective"] == "sgsd"
    resolved = json.loads((run / "loop_config.json").read_text())
    assert resolved["loop"]["eval_every"] == 2 and resolved["rollout"]["max_new_tokens"] == 6
    # rerun: everything is complete, nothing is redone
    before = (run / "step_0002" / "train.parquet").stat().st_mtime
    _run(cfg, ["loop.eval_every=2", "loop.skill_update_every=1"])
    assert (run / "step_0002" / "train.parquet").stat().st_mtime == before


@pytest.mark.parametrize("objective,n", [("grpo", 2), ("opsd", 1)])
def test_baseline_objectives_in_the_loop(tmp_path, tiny_model_dir, objective, n):
    cfg = _cfg(tmp_path, tiny_model_dir, objective=objective, steps=1, n=n)
    m = pl.read_parquet(_run(cfg))
    run = tmp_path / "run"
    assert m.height == 1 and m["objective"][0] == objective
    assert (run / "step_0001" / "polarize_rollouts.parquet").exists()
    assert not (run / "step_0001" / "score_teachers.parquet").exists()
    tr = pl.read_parquet(run / "step_0001" / "train.parquet")
    assert ("reward" if objective == "grpo" else "kl_per_token") in tr.columns
    if objective == "grpo":
        assert pl.read_parquet(run / "step_0001" / "rollout.parquet").height == 4  # 2 prompts x G=2


def test_loop_extends_and_refuses_a_changed_config(tmp_path, tiny_model_dir):
    from stages.engine.errors import InputError

    cfg = _cfg(tmp_path, tiny_model_dir, steps=1)
    _run(cfg)
    m = pl.read_parquet(_run(cfg, ["loop.steps=2"]))  # more steps: continues
    assert m["step"].to_list() == [1, 2]
    with pytest.raises(InputError, match="train.lr"):
        _run(cfg, ["loop.steps=3", "train.lr=0.5"])


def test_config_errors_and_cli(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from sgsd_cli.common import app
    from sgsd_cli.main import _register
    from stages.engine.config import parse_value

    _register()
    assert parse_value("1e-5") == 1e-5 and parse_value("true") is True and parse_value("[1, 2]") == [1, 2]
    assert parse_value("runs/x") == "runs/x"
    cfg = _cfg(tmp_path, tiny_model_dir, steps=1)
    runner = CliRunner()
    r = runner.invoke(app, ["loop", "--config", str(cfg), "--set", "train.lr=2e-4", "--dry-run"])
    assert r.exit_code == 0, r.output
    printed = json.loads(r.stdout)
    assert printed["train"]["lr"] == 2e-4 and printed["train"]["objective"] == "sgsd"
    assert printed["rollout"]["max_new_tokens"] == 6
    bad = tmp_path / "bad.toml"
    bad.write_text(cfg.read_text().replace("micro_batch_size = 2", "micro_batch = 2"))
    r = runner.invoke(app, ["loop", "--config", str(bad)])
    assert r.exit_code == 2 and "bad.toml" in r.output and "unknown option 'train.micro_batch'" in r.output
    r = runner.invoke(app, ["loop", "--config", str(cfg), "--set", "rollout.max_new_tokens=many"])
    assert r.exit_code == 2 and "rollout.max_new_tokens: expected an integer" in r.output
    r = runner.invoke(app, ["loop", "--config", str(cfg), "--set", "trian.lr=1"])
    assert r.exit_code == 2 and "unknown config section 'trian'" in r.output
    bad.write_text("[loop\nsteps = 1")
    r = runner.invoke(app, ["loop", "--config", str(bad)])
    assert r.exit_code == 2 and "invalid TOML" in r.output


def test_shipped_recipes_resolve(tmp_path):
    """Every config in configs/ builds every stage's config (no unknown keys, right types)."""
    from stages import loop
    from stages.engine.config import load_toml

    root = Path(__file__).resolve().parent.parent / "configs"
    recipes = sorted(root.glob("*.toml"))
    assert {p.name for p in recipes} >= {"sgsd_qwen3_1.7b.toml", "opsd_qwen3_1.7b.toml", "grpo_qwen3_1.7b.toml",
                                          "smoke_cpu.toml"}
    for p in recipes:
        if "loop" not in load_toml(p):
            continue  # not a loop recipe (configs/world.toml configures `sgsd world`)
        s = loop.build_sections(load_toml(p), str(p))
        r = s.resolved()
        assert r["train"]["objective"] == r["loop"]["objective"]
        if p.name.startswith("sgsd"):
            assert r["train"]["lora"] and r["train"]["lora_r"] == 64 and r["train"]["lora_alpha"] == 128
            assert r["train"]["lr"] == 5e-6 and r["train"]["max_grad_norm"] == 0.1 and r["loop"]["steps"] == 200
            assert r["train"]["teacher_mode"] == "live" and r["score_teachers"]["k"] == 8
        if p.name.startswith("grpo"):
            assert r["rollout"]["n"] == 8 and r["train"]["kl_beta"] == 0.0 and r["train"]["clip_eps"] == 0.2
            assert r["rollout"]["temperature"] == 1.2
        if p.name.startswith("opsd"):
            assert r["train"]["teacher_mode"] == "fixed" and r["train"]["kl_clip"] == 0.05


def _command_options() -> dict[str, set[str]]:
    import typer

    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    _register()
    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} for name, cmd in group.commands.items()}


@pytest.mark.parametrize("recipe", ["sgsd", "opsd", "grpo"])
def test_shell_recipes_parse_and_dry_run(tmp_path, recipe, tiny_model_dir):
    """bash -n; --dry-run checks the recipe as `sgsd loop --dry-run` does (stderr), then prints one resolved
    command per stage, each using only options its command has; a failed check prints no command."""
    import shlex
    import subprocess

    script = Path(__file__).resolve().parent.parent / "scripts" / f"recipe_{recipe}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"PATH": __import__("os").environ["PATH"], "STEPS": "2", "EVAL_EVERY": "2", "SKILLS_EVERY": "1",
           "MODEL": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run: training pool: train = " in r.stderr and "problems)" in r.stderr, r.stderr
    assert "dry run: backend: auto -> " in r.stderr
    bad = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "run")], capture_output=True, text=True,
                         env={**env, "MODEL": str(tmp_path / "no_model")}, timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "model path does not exist" in bad.stderr
    lines = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    assert not (tmp_path / "run").exists()  # nothing ran
    stages = [words[1] for words in lines if words[0] == "sgsd"]
    want = {"sgsd": ["rollout", "score-teachers", "polarize", "train", "update-skills"] * 2,
            "opsd": ["rollout", "train"] * 2, "grpo": ["rollout", "train"] * 2}[recipe]
    assert [s for s in stages if s not in ("eval", "step-problems")] == want
    assert stages.count("step-problems") == 2  # the loop's sampler, through the sgsd command
    assert stages.count("eval") == 1
    opts = _command_options()
    for words in lines:
        if words[0] != "sgsd":
            assert False, words  # every recipe line is an sgsd command
            continue
        used = {w for w in words[2:] if w.startswith("--")}
        assert used <= opts[words[1]], (words[1], used - opts[words[1]])
    train = next(w for w in lines if w[:2] == ["sgsd", "train"])
    assert train[train.index("--objective") + 1] == recipe
    second_rollout = [w for w in lines if w[:2] == ["sgsd", "rollout"]][1]
    assert second_rollout[second_rollout.index("--model") + 1].endswith("step_0001/checkpoint")


def test_loop_keeps_one_resident_engine_and_refreshes_its_weights(tmp_path, tiny_model_dir, monkeypatch):
    """backend hf-fast: one engine for the whole loop, update_weights after every training step."""
    from stages.engine.generation import fast as fast_generation

    built, updates = [], []
    orig_init, orig_update = fast_generation.FastHFBackend.__init__, fast_generation.FastHFBackend.update_weights

    def init(self, *a, **k):
        built.append(1)
        orig_init(self, *a, **k)

    def update(self, model):
        updates.append(1)
        orig_update(self, model)

    monkeypatch.setattr(fast_generation.FastHFBackend, "__init__", init)
    monkeypatch.setattr(fast_generation.FastHFBackend, "update_weights", update)
    cfg = _cfg(tmp_path, tiny_model_dir, steps=3)
    _run(cfg, ['loop.backend="hf-fast"'])
    assert len(built) == 1 and len(updates) == 2
    for n in (1, 2, 3):
        ro = pl.read_parquet(tmp_path / "run" / f"step_{n:04d}" / "rollout.parquet")
        assert set(ro["backend"]) == {"hf-fast"} and set(ro["policy_step"]) == {n - 1}


@pytest.mark.parametrize("recipe,gpus,config", [("sgsd_4gpu", 4, "sgsd_qwen3_1.7b.toml"), ("opsd_8gpu", 8, "opsd_qwen3_1.7b.toml")])
def test_multi_gpu_recipes_are_one_torchrun_line(tmp_path, recipe, gpus, config, tiny_model_dir):
    """--dry-run prints one torchrun line: N ranks of `sgsd loop` on the recipe's config, options that exist,
    overrides that resolve."""
    import shlex
    import subprocess

    from stages import loop
    from stages.engine.config import resolve

    root = Path(__file__).resolve().parent.parent
    script = root / "scripts" / f"recipe_{recipe}.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "--dry-run", str(tmp_path / "run")], capture_output=True, text=True,
                       env={"PATH": __import__("os").environ["PATH"], "MODEL": str(tiny_model_dir)}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "dry run: every input checked" in r.stderr  # the loop's own check ran first
    lines = [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and not (tmp_path / "run").exists()
    words = lines[0]
    assert words[0] == "torchrun" and words[words.index("--nproc_per_node") + 1] == str(gpus)
    at = words.index("--no-python")
    assert words[at + 1: at + 3] == ["sgsd", "loop"]
    used = {w for w in words[at + 3:] if w.startswith("--")}
    assert used <= _command_options()["loop"], used
    cfg = words[words.index("--config") + 1]
    assert cfg == f"configs/{config}"
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    sections, source = resolve(root / cfg, sets)
    S = loop.build_sections(sections, source)
    assert S.train.distributed == "ddp" and S.loop.vllm_gpu_memory_utilization in (0.4, 0.6)
    # the global batch is the step's prompts whatever the GPU count (micro batch x accumulation x ranks)
    assert S.train.batch_size == 0 and S.loop.prompts_per_step % gpus == 0


def test_rank_blocks_and_engine_options():
    """Which block of a step's prompts a rank generates (one per rank, or one per tensor-parallel group), and the
    [loop] table's vLLM options as the engine receives them."""
    from stages.engine.distributed import Dist
    from stages.engine.errors import InputError
    from stages.loop import LoopConfig, _engine_options, _shard

    assert [_shard(Dist(rank=r, world=4)) for r in range(4)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [_shard(Dist(rank=r, world=4), 2) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    with pytest.raises(InputError, match="must divide"):
        _shard(Dist(rank=0, world=4), 3)
    lc = LoopConfig(model="m", backend="vllm", vllm_tensor_parallel=2, vllm_sleep=1, vllm_gpu_memory_utilization=0.4)
    assert _engine_options(lc) == {"tensor_parallel_size": 2, "sleep_mode": True, "gpu_memory_utilization": 0.4}
    assert _engine_options(LoopConfig(model="m", backend="hf", vllm_sleep=1)) == {}


def test_loop_that_fails_to_start_claims_nothing(tmp_path, tiny_model_dir):
    """Issue 21: a startup failure (a missing problems file) leaves no loop_config.json, so the corrected command
    (another problems path) is not refused as 'started with another config'; an unusable bank is refused before
    the run directory exists at all."""
    from stages.engine.errors import InputError

    cfg = _cfg(tmp_path, tiny_model_dir, steps=1)
    with pytest.raises(InputError, match="none.jsonl"):
        _run(cfg, [f"loop.problems='{tmp_path / 'none.jsonl'}'"])
    assert not (tmp_path / "run" / "loop_config.json").exists()
    bad = tmp_path / "bad_bank.json"
    bad.write_text(json.dumps({"general_skills": [], "common_mistakes": []}))
    with pytest.raises(InputError, match="0 general skills and 0 common mistakes"):
        _run(cfg, [f"loop.bank='{bad}'", f"loop.run_dir='{tmp_path / 'fresh'}'"])
    assert not (tmp_path / "fresh").exists()
    m = pl.read_parquet(_run(cfg))  # the corrected command runs
    assert m["step"].to_list() == [1] and (tmp_path / "run" / "loop_config.json").exists()


def test_collapse_alarm_warns_and_can_stop_the_loop(tmp_path, tiny_model_dir, monkeypatch):
    """metrics.parquet carries an `alarms` column; an alarm is one warning line, and with loop.alarm_stop the
    loop stops with exit-2 InputError naming the step (the alarm itself is forced here: tests/test_alarms.py
    checks the bands by hand)."""
    import stages.loop as loop_mod
    from stages.engine.errors import InputError

    cfg = _cfg(tmp_path, tiny_model_dir, objective="grpo", steps=1, n=2)
    m = pl.read_parquet(_run(cfg))
    assert m["alarms"].to_list() == [""] and m["prompts"].to_list() == [2]
    monkeypatch.setattr(loop_mod, "new_alarms", lambda rows: ["reward: last-5-step mean 0.10, down from 0.80"])
    cfg2 = _cfg(tmp_path, tiny_model_dir, objective="grpo", steps=1, n=2, name="stop")
    with pytest.raises(InputError, match="collapse alarm at step 1: reward"):
        _run(cfg2, ["loop.alarm_stop=true"])


def test_run_dir_written_before_a_field_existed_still_matches(tmp_path):
    """A field absent from an older loop_config.json matches when the new value is its default; a non-default
    value of it, or a changed recorded field, is still refused (naming the field)."""
    from stages.engine.errors import InputError
    from stages.loop import _check_run_dir

    new = {"loop": {"steps": 3, "objective": "sgsd"}, "train": {"lr": 1e-3, "reversed_tokens": "all"}}
    defaults = {"train": {"lr": 5e-6, "reversed_tokens": "all"}, "loop": {"steps": 200}}
    (tmp_path / "loop_config.json").write_text(json.dumps({"loop": {"steps": 2, "objective": "sgsd"},
                                                           "train": {"lr": 1e-3}}))
    _check_run_dir(tmp_path, new, force=False, write=False, defaults=defaults)  # steps may grow; field at default
    with pytest.raises(InputError, match=r"differs in train\.reversed_tokens"):
        _check_run_dir(tmp_path, {**new, "train": {"lr": 1e-3, "reversed_tokens": "stance"}}, False, False, defaults)
    with pytest.raises(InputError, match=r"differs in train\.lr"):
        _check_run_dir(tmp_path, {**new, "train": {"lr": 2e-3, "reversed_tokens": "all"}}, False, False, defaults)


def test_derived_seeds_hand_values():
    """The seeds a loop step derives (stages/engine/seeds.py): the formulas earlier runs used."""
    from stages.engine.seeds import derive_seed

    assert derive_seed(3, 5, "rollout") == 300_014  # 3 * 100003 + 5
    assert derive_seed(3, 5, "score_teachers") == derive_seed(3, 5, "probe") == 8
    assert derive_seed(3, 5, "optimizer", rank=2) == 3_249_062  # 3000009 + 39595 + 209458
    with pytest.raises(ValueError, match="unknown seed use"):
        derive_seed(3, 5, "eval")
