"""One way to wire a command (docs/DESIGN.md 2): options come from the config dataclasses, with ranges checked."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from stages.engine.config import Checked, check, field_opt, opt
from stages.engine.errors import InputError

CONFIGS = [
    ("stages.rollout", "RolloutConfig"), ("stages.score_teachers", "ScoreTeachersConfig"),
    ("stages.polarize", "PolarizeConfig"), ("stages.train", "TrainConfig"), ("stages.eval", "EvalConfig"),
    ("stages.mine_skills", "MineSkillsConfig"), ("stages.build_index", "BuildIndexConfig"),
    ("stages.update_skills", "UpdateSkillsConfig"), ("stages.loop", "LoopConfig"),
    ("stages.engine.skills.writer", "WriterConfig"), ("stages.engine.skills.mining", "MiningParams"),
    ("stages.sft", "SFTConfig"), ("stages.export", "ExportConfig"),
]


def _cls(mod, name):
    import importlib

    return getattr(importlib.import_module(mod), name)


def _app():
    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    _register()
    return app


@pytest.mark.parametrize("mod,name", CONFIGS)
def test_every_config_field_is_documented_and_checked(mod, name):
    cls = _cls(mod, name)
    assert issubclass(cls, Checked)
    for f in dataclasses.fields(cls):
        o = field_opt(f)
        assert o["help"].strip(), f"{name}.{f.name} has no help text"
        assert o["group"], f"{name}.{f.name} has no help panel"


@dataclasses.dataclass
class _Toy(Checked):
    n: int = opt(1, "count", ge=1)
    p: float = opt(0.5, "mass", gt=0, le=1)
    mode: str = opt("a", "mode", choices=("a", "b"))
    maybe: int | None = opt(None, "optional", ge=0)


@pytest.mark.parametrize("kw,msg", [
    ({"n": 0}, "--n must be >= 1 (got 0)"),
    ({"p": 0.0}, "--p must be > 0 and <= 1 (got 0.0)"),
    ({"p": 1.5}, "--p must be > 0 and <= 1 (got 1.5)"),
    ({"p": float("nan")}, "--p must be a finite number (got nan)"),
    ({"mode": "c"}, "--mode must be one of a, b (got 'c')"),
    ({"maybe": -1}, "--maybe must be >= 0 (got -1)"),
])
def test_range_checks_refuse_with_the_option_name(kw, msg):
    with pytest.raises(InputError) as e:
        _Toy(**kw)
    assert e.value.problem == msg
    with pytest.raises(InputError):  # dataclasses.replace goes through the same check
        dataclasses.replace(_Toy(), **kw)


def test_range_checks_accept_the_edges():
    _Toy(n=1, p=1.0, mode="b", maybe=None)
    _Toy(maybe=0)
    check(_Toy())


def test_stage_options_refused_before_any_work(tmp_path):
    run = CliRunner()
    app = _app()
    for args, text in [(["--n", "0"], "--n must be >= 1 (got 0)"), (["--top-p", "2"], "--top-p must be > 0 and <= 1"),
                       (["--temperature", "-1"], "--temperature must be >= 0"), (["--top-k", "-5"], "--top-k must be >= 0"),
                       (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"), (["--limit", "-1"], "--limit must be >= 1"),
                       (["--decode-batch", "0"], "--decode-batch must be >= 1"), (["--set", "n=0"], "--n must be >= 1")]:
        r = run.invoke(app, ["rollout", "--run-dir", str(tmp_path / "r"), "--model", "nope", *args])
        assert r.exit_code == 2, (args, r.output)
        assert text in r.output and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "r").exists()


def test_precedence_defaults_toml_options_set(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[rollout]\nn = 3\ntemperature = 0.7\n')
    run = CliRunner()
    app = _app()

    def resolved(*args):
        r = run.invoke(app, ["rollout", "--run-dir", str(tmp_path / "r"), "--model", "m", "--dry-run", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    assert resolved()["n"] == 1 and resolved()["temperature"] == 1.1          # dataclass defaults
    assert resolved("--config", str(toml))["n"] == 3                            # TOML over defaults
    got = resolved("--config", str(toml), "--n", "2")
    assert got["n"] == 2 and got["temperature"] == 0.7                          # option over TOML
    assert resolved("--config", str(toml), "--n", "2", "--set", "n=4")["n"] == 4  # --set over everything
    assert resolved("--shard", "1/3")["shard"] == [1, 3]
    assert not (tmp_path / "r").exists()  # --dry-run runs nothing


def test_toml_value_out_of_range_names_the_file(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[rollout]\ntop_p = 3.0\n')
    r = CliRunner().invoke(_app(), ["rollout", "--run-dir", str(tmp_path / "r"), "--model", "m", "--config", str(toml)])
    assert r.exit_code == 2 and str(toml) in r.output and "--top-p" in r.output


def test_help_shows_the_dataclass_defaults_and_panels():
    from stages.train import TrainConfig

    r = CliRunner().invoke(_app(), ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for panel in ("Optimisation", "LoRA", "Teacher", "SGSD", "OPSD", "GRPO", "Checkpoints"):
        assert panel in r.output
    assert f"[default: {TrainConfig().lr}]" in r.output and "[default: 0.1]" in r.output  # max_grad_norm
    assert "[tokens, vocab]" in r.output  # rich markup does not swallow it


@pytest.mark.parametrize("command", ["train", "eval", "update-skills"])
def test_dry_run_runs_nothing_for_every_kind_of_command(tmp_path, command):
    r = CliRunner().invoke(_app(), [command, "--run-dir", str(tmp_path / "r"), "--model", "m", "--dry-run",
                                    "--config", "configs/sgsd_qwen3_1.7b.toml"])
    assert r.exit_code == 0, r.output
    cfg = json.loads(r.output)
    assert cfg["model"] == "m"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["world", "--help"], ["world", "build", "--help"]])
def test_help_flags_carry_no_type_label(argv):
    """No flag shows a `<bool>` label (Typer's own --help included), and `[world]` survives rich markup."""
    from sgsd_cli.main import _register

    _register()
    r = CliRunner().invoke(_app(), argv, env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "--help" in r.output and "<bool>" not in r.output
    if argv[-2:] == ["build", "--help"]:
        assert "[world] table" in r.output and "[experiment] table" in r.output


def test_runtime_fields_are_marked_once_and_left_out_of_every_stage_key():
    """opt(key=False) fields (device, logging, snapshot cadence) are not part of any stage key; key="if-set" fields
    only when set; the train, sft, rollout and score-teachers keys all follow the marks."""
    from stages.engine.config import runtime_fields, stage_key
    from stages.eval import EvalConfig
    from stages.export import ExportConfig
    from stages.rollout import RolloutConfig
    from stages.score_teachers import ScoreTeachersConfig
    from stages.sft import SFTConfig
    from stages.train import TrainConfig

    assert runtime_fields(TrainConfig) == ("log_entropy", "distributed", "device", "save_every", "keep_last",
                                           "tensorboard", "wandb_project", "agreement_rollouts", "agreement_threshold")
    assert runtime_fields(SFTConfig) == ("device", "save_every", "keep_last", "log_every")
    assert runtime_fields(RolloutConfig) == runtime_fields(ScoreTeachersConfig) == ("device",)
    assert runtime_fields(EvalConfig) == ("grade_workers", "device")
    assert runtime_fields(ExportConfig) == ("device",)
    assert ExportConfig(device="cuda", dtype="bf16").key() == {"dtype": "bf16", "max_shard_gb": 5.0, "probe_tokens": 64}
    key = TrainConfig(model="m", device="cpu", save_every=3).key()
    assert "device" not in key and "save_every" not in key and "is_correction" not in key and key["model"] == "m"
    assert TrainConfig(model="m", objective="grpo", is_correction="token-mask").key()["is_correction"] == "token-mask"
    a = stage_key({"config": ScoreTeachersConfig(model="m", device="cpu"), "source": "x"})
    b = stage_key({"config": ScoreTeachersConfig(model="m", device="cuda"), "source": "x"})
    assert a == b and "device" not in a["config"] and a["config"]["k"] == 8 and a["source"] == "x"


def test_a_manifest_written_with_a_runtime_field_still_matches(tmp_path):
    """A manifest from before ``device`` became runtime-only (its config holds device) is not stale."""
    import json

    import polars as pl

    from stages.engine.manifest import StageRun
    from stages.score_teachers import ScoreTeachersConfig

    cfg = ScoreTeachersConfig(model="m", device="cpu")
    run = StageRun(tmp_path, "score_teachers", {"config": cfg}, inputs={})
    run.finish(pl.DataFrame({"x": [1]}))
    man = tmp_path / "score_teachers.manifest.json"
    m = json.loads(man.read_text())
    assert "device" not in m["config"]["config"]
    m["config"]["config"]["device"] = "cuda"  # as an older version wrote it
    man.write_text(json.dumps(m))
    assert StageRun(tmp_path, "score_teachers", {"config": cfg}, inputs={}).done
    m["config"]["config"]["k"] = 4  # a field of the key still counts
    man.write_text(json.dumps(m))
    from stages.engine.errors import InputError

    with pytest.raises(InputError, match="config changed"):
        StageRun(tmp_path, "score_teachers", {"config": cfg}, inputs={})


def test_shared_fields_are_declared_once():
    """device / gguf_file / dtype read the same wherever a stage declares them with shared_opt (the one declaration
    in stages/engine/config.py SHARED); device is runtime-only on every stage."""
    import dataclasses

    from stages.engine.config import SHARED, field_opt
    from stages.eval import EvalConfig
    from stages.loop import LoopConfig
    from stages.mine_skills import MineSkillsConfig
    from stages.rollout import RolloutConfig
    from stages.score_teachers import ScoreTeachersConfig
    from stages.sft import SFTConfig
    from stages.train import TrainConfig
    from stages.update_skills import UpdateSkillsConfig

    for cls in (EvalConfig, LoopConfig, MineSkillsConfig, RolloutConfig, ScoreTeachersConfig, SFTConfig, TrainConfig,
                UpdateSkillsConfig):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name in ("device", "gguf_file", "dtype"):
            if name in fields:
                o = field_opt(fields[name])
                assert (fields[name].default, o["help"]) == (SHARED[name]["default"], SHARED[name]["help"]), (cls, name)
        assert field_opt(fields["device"])["key"] is False


def test_export_takes_set_and_its_recipe_table(tmp_path):
    """`sgsd export` reads an [export] table and --set (bare or export.-prefixed) like every stage; an unknown key
    or an out-of-range value is one error line and exit 2, nothing written."""
    app, run = _app(), CliRunner()
    toml = tmp_path / "r.toml"
    toml.write_text('[export]\ndtype = "fp16"\nmax_shard_gb = 2.0\n')
    out = tmp_path / "out"

    def resolved(*args):
        r = run.invoke(app, ["export", str(tmp_path / "ckpt"), str(out), "--dry-run", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    assert resolved()["dtype"] == "auto"                                              # the dataclass default
    assert resolved("--set", "dtype=bf16")["dtype"] == "bf16"
    assert resolved("--set", "export.probe_tokens=0")["probe_tokens"] == 0
    got = resolved("--config", str(toml))
    assert (got["dtype"], got["max_shard_gb"]) == ("fp16", 2.0)                        # TOML over defaults
    assert resolved("--config", str(toml), "--dtype", "fp32", "--set", "max_shard_gb=3")["max_shard_gb"] == 3.0
    assert resolved("--config", str(toml), "--dtype", "fp32")["dtype"] == "fp32"       # option over TOML
    for args, text in [(["--set", "nope=1"], "unknown option 'export.nope'"),
                       (["--set", "dtype=fp8"], "--dtype must be one of auto, fp32, bf16, fp16"),
                       (["--set", "train.lr=1"], "sgsd export takes export.* overrides only")]:
        r = run.invoke(app, ["export", str(tmp_path / "ckpt"), str(out), *args])
        assert r.exit_code == 2, (args, r.output)
        assert text in r.output and "Traceback" not in r.output, (args, r.output)
    bad = tmp_path / "bad.toml"
    bad.write_text('[export]\nshard_gb = 1\n')
    r = run.invoke(app, ["export", str(tmp_path / "ckpt"), str(out), "--config", str(bad)])
    assert r.exit_code == 2 and str(bad) in r.output and "unknown option 'export.shard_gb'" in r.output, r.output
    assert not out.exists()
