"""`sgsd eval --checkpoints RUN`: every saved step on a validation set, the choice by a named rule, the test sets
on the chosen step only; several sampling seeds and their spread; bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from stages import eval as ev
from stages.engine import checkpoint as ckpt
from stages.engine.generation.hf import HFBackend
from stages.engine.atomic import write_parquet
from stages.engine.errors import InputError
from tests.conftest import DEMO_PROBLEMS
from tests.test_eval_stage import ScriptedBackend, demo_golds, invoke


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ev.CRASH_ENV, raising=False)
    monkeypatch.delenv("SGSD_DATA_DIR", raising=False)


def save_ckpt(path: Path, step: int, model_dir: Path | None = None) -> Path:
    """A checkpoint folder as `sgsd train` writes it (checksummed): the model files (when given), trainer state
    and metadata with its policy step."""
    def fill(tmp: Path) -> None:
        if model_dir is not None:
            for f in model_dir.iterdir():
                if f.is_file():
                    shutil.copy(f, tmp / f.name)
        (tmp / ckpt.STATE).write_text(json.dumps({"policy_step": step, "local_step": step}))
        (tmp / ckpt.META).write_text(json.dumps({"format": ckpt.FORMAT, "policy_step": step, "objective": "sgsd"}))

    return ckpt.write(path, fill)


def train_run(root: Path, steps: list[int], final: int, model_dir: Path | None = None) -> Path:
    for s in steps:
        save_ckpt(ckpt.step_dir(root, s), s, model_dir)
    save_ckpt(root / ckpt.FINAL, final, model_dir)
    return root


def split_demo(tmp_path: Path) -> tuple[Path, Path]:
    """The demo problems split in two files: val.jsonl (first 20) and test.jsonl (last 20)."""
    rows = [x for x in DEMO_PROBLEMS.read_text().splitlines() if x.strip()]
    val, test = tmp_path / "val.jsonl", tmp_path / "test.jsonl"
    val.write_text("\n".join(rows[:20]) + "\n")
    test.write_text("\n".join(rows[20:]) + "\n")
    return val, test


# --------------------------------------------------------------------------------------------------


def test_checkpoints_of_train_and_loop_run_dirs(tmp_path):
    t = train_run(tmp_path / "train", [2, 4], final=6)
    got = ev.list_checkpoints(t)
    assert [(c.step, c.loop_step, c.path.relative_to(t).as_posix()) for c in got] == [
        (2, None, "checkpoints/step_000002"), (4, None, "checkpoints/step_000004"), (6, None, "checkpoint")]
    loop = tmp_path / "loop"
    save_ckpt(loop / "step_0001" / ckpt.FINAL, 3)
    save_ckpt(ckpt.step_dir(loop / "step_0002", 5), 5)  # a --save-every snapshot inside a loop step
    save_ckpt(loop / "step_0002" / ckpt.FINAL, 6)
    (loop / "step_0003").mkdir()  # a step whose checkpoint the loop pruned (--keep-last)
    got = ev.list_checkpoints(loop)
    assert [(c.step, c.loop_step, c.label) for c in got] == [(3, 1, "step_000003"), (5, 2, "step_000005"),
                                                             (6, 2, "step_000006")]


@pytest.mark.parametrize("case, want", [
    ("empty", "no checkpoints in this run directory"),
    ("missing", "training run directory not found"),
    ("is_checkpoint", "this is a checkpoint folder, not a run directory"),
    ("corrupt", "does not match its checksum"),
    ("twice", "policy step 4 is saved twice"),
    ("bad_step", "no valid policy_step"),
])
def test_bad_run_directories_are_refused(tmp_path, case, want):
    run = tmp_path / "run"
    run.mkdir()
    if case == "is_checkpoint":
        run = save_ckpt(run / ckpt.FINAL, 1)
    elif case == "corrupt":
        train_run(run, [2], final=4)
        (run / "checkpoints" / "step_000002" / ckpt.STATE).write_text("{}")
    elif case == "twice":
        train_run(run, [4], final=4)
    elif case == "bad_step":
        save_ckpt(run / ckpt.FINAL, -3)
    elif case == "missing":
        run = tmp_path / "nope"
    with pytest.raises(InputError, match=want):
        ev.list_checkpoints(run)


# hand-made validation / test values per policy step: the choice must follow the validation curve only
VAL = {2: 0.30, 4: 0.55, 6: 0.55, 8: 0.20}   # best-avg: 4 (ties with 6, the earlier step wins); last: 8
TEST = {2: 0.10, 4: 0.35, 6: 0.50, 8: 0.90}  # the test sets would pick 8: they must not be looked at


def fake_eval(calls: list):
    """Stands in for stages.eval.run: writes a summary with the hand values of the checkpoint's step."""
    def run(cfg, run_dir, **kw):
        cfg = cfg.resolved()
        step = json.loads((Path(cfg.model) / ckpt.META).read_text())["policy_step"]
        is_val = "test.jsonl" not in " ".join(cfg.problems)
        calls.append({"step": step, "val": is_val, "problems": list(cfg.problems), "benches": list(cfg.benches),
                      "limit": cfg.limit, "seeds": cfg.seeds, "join_earlier": kw.get("join_earlier")})
        v = (VAL if is_val else TEST)[step]
        names = [Path(p).name.split(".")[0] for p in cfg.problems]
        rows = [{"bench": b, "n": 2, "problems": 5, "samples": 10, "avg_at_n": v, "avg_at_n_se": 0.01,
                 "model": cfg.model, "protocol": cfg.protocol, "source": "", "seeds": 1, "seed_min": v, "seed_max": v}
                for b in names]
        path = Path(run_dir) / "eval" / "summary.parquet"
        write_parquet(pl.DataFrame(rows, schema=ev.SUMMARY_SCHEMA), path)
        return path
    return run


@pytest.mark.parametrize("rule, chosen", [("best-avg", 4), ("last", 8)])
def test_choice_follows_the_validation_curve_and_tests_only_the_chosen_step(tmp_path, monkeypatch, rule, chosen):
    run = train_run(tmp_path / "train", [2, 4, 6], final=8)
    val, test = split_demo(tmp_path)
    calls: list = []
    monkeypatch.setattr(ev, "run", fake_eval(calls))
    cfg = ev.EvalConfig(checkpoints=str(run), val=[str(val)], val_limit=5, problems=[str(test)], limit=7,
                        protocol="quick", select=rule)
    paths = ev.run_checkpoints(cfg, tmp_path / "out")
    vals = [c for c in calls if c["val"]]
    tests = [c for c in calls if not c["val"]]
    assert [c["step"] for c in vals] == [2, 4, 6, 8]
    assert all(c["problems"] == [str(val)] and c["benches"] == [] and c["limit"] == 5 for c in vals)
    assert all(c["join_earlier"] is False for c in calls)
    assert [c["step"] for c in tests] == [chosen]  # the test sets ran on the chosen step only
    assert tests[0]["problems"] == [str(test)] and tests[0]["limit"] == 7
    curve = pl.read_parquet(paths["validation"]).sort("step")
    assert curve["step"].to_list() == [2, 4, 6, 8] and curve["avg_at_n"].to_list() == [VAL[s] for s in (2, 4, 6, 8)]
    assert curve["bench"].to_list() == ["val"] * 4 and curve["loop_step"].is_null().all()
    c = pl.read_parquet(paths["choice"]).row(0, named=True)
    assert (c["rule"], c["step"], c["val_value"], c["candidates"]) == (rule, chosen, VAL[chosen], 4)
    assert (c["first_step"], c["last_step"], c["val_sets"], c["test_sets"]) == (2, 8, "val", "test")
    assert c["checkpoint"].endswith("checkpoint" if chosen == 8 else f"step_{chosen:06d}")
    t = pl.read_parquet(paths["test"])
    assert t["step"].to_list() == [chosen] and t["avg_at_n"].to_list() == [TEST[chosen]]
    assert pl.read_parquet(paths["summary"])["avg_at_n"].to_list() == [TEST[chosen]]
    for name in ("validation", "choice", "test"):
        m = json.loads((tmp_path / "out" / "select" / f"{name}.manifest.json").read_text())
        assert m["complete"]


def test_overlap_with_the_test_set_is_refused_or_reported(tmp_path, monkeypatch):
    run = train_run(tmp_path / "train", [], final=2)
    val, test = split_demo(tmp_path)
    with pytest.raises(InputError, match="also a test set"):
        ev.run_checkpoints(ev.EvalConfig(checkpoints=str(run), val=[str(test)], problems=[str(test)]), tmp_path / "o")
    # a validation file sharing a problem with the test set: warned about and counted in the choice
    shared = tmp_path / "shared.jsonl"
    shared.write_text(val.read_text() + test.read_text().splitlines()[0].replace('"id": "', '"id": "dup-') + "\n")
    monkeypatch.setattr(ev, "run", fake_eval([]))
    said: list[str] = []
    cfg = ev.EvalConfig(checkpoints=str(run), val=[str(shared)], problems=[str(test)])
    paths = ev.run_checkpoints(cfg, tmp_path / "out", log=said.append)
    assert any("1 of the 21 problems of validation set 'shared' are also in the test sets" in x for x in said), said
    assert pl.read_parquet(paths["choice"])["val_test_overlap"].to_list() == [1]


def test_cli_on_tiny_checkpoints_with_seeds(tiny_model_dir, tmp_path, monkeypatch):
    """The real path: three checkpoints of the tiny random model, two seeds.  The tiny model answers nothing
    right, so every step ties at 0 and best-avg must take the earliest; the test set runs on it alone."""
    run = train_run(tmp_path / "train", [1, 2], final=3, model_dir=tiny_model_dir)
    val, test = split_demo(tmp_path)
    out = tmp_path / "out"
    args = ["--checkpoints", str(run), "--val", str(val), "--val-limit", "2", "--problems", str(test), "--limit", "2",
            "--protocol", "quick", "--n", "1", "--max-new-tokens", "3", "--seeds", "2", "--run-dir", str(out),
            "--device", "cpu"]
    res = invoke(args)
    assert res.exit_code == 0, res.output
    assert "<- chosen" in res.output and "seed sd" in res.output
    c = pl.read_parquet(out / "select" / "choice.parquet").row(0, named=True)
    assert c["step"] == 1 and c["val_value"] == 0.0 and c["seeds"] == "0,1"
    assert sorted(p.name for p in (out / "select" / "val").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert [p.name for p in (out / "select" / "test").iterdir()] == ["step_000001"]
    for s in (0, 1):  # each seed a full eval of its own
        rows = pl.read_parquet(out / "select" / "val" / "step_000002" / "eval" / f"seed_{s}" / "val.parquet")
        assert rows.height == 2 and rows["problem_id"].to_list() == ["demo-000", "demo-001"]
    curve = pl.read_parquet(out / "select" / "validation.parquet")
    assert curve["step"].to_list() == [1, 2, 3] and curve["seeds"].to_list() == [2, 2, 2]
    t = pl.read_parquet(out / "eval" / "summary.parquet").row(0, named=True)
    assert t["bench"] == "test" and t["seeds"] == 2 and t["problems"] == 2 and t["samples"] == 4
    assert (out / "report" / "checkpoint_choice.png").exists()
    # a rerun generates nothing (every per-step eval resumes from its manifest)
    monkeypatch.setattr(HFBackend, "generate", lambda *a, **k: pytest.fail("rerun generated"))
    res = invoke(args)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("case, want", [
    ("no_checkpoints", "no checkpoints in this run directory"),
    ("val_is_test", "would peek at the test set"),
    ("no_val", "--checkpoints needs --val"),
    ("val_without_checkpoints", "--val and --val-limit are taken with --checkpoints RUN only"),
    ("model_too", "--model and --checkpoints exclude each other"),
    ("bad_seeds", "--seeds: the count must be between 1 and 100"),
    ("bad_rule", "--select must be one of best-avg, last"),
    ("bad_val_limit", "--val-limit must be >= 1"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case, want):
    run = tmp_path / "train"
    run.mkdir()
    if case != "no_checkpoints":
        save_ckpt(run / ckpt.FINAL, 1)
    val, test = split_demo(tmp_path)
    out = tmp_path / "out"
    args = ["--checkpoints", str(run), "--val", str(val), "--problems", str(test), "--run-dir", str(out)]
    if case == "val_is_test":
        args[3] = str(test)
    elif case == "no_val":
        args = args[:2] + args[4:]
    elif case == "val_without_checkpoints":
        args = ["--model", "m"] + args[2:]
    elif case == "model_too":
        args += ["--model", "m"]
    elif case == "bad_seeds":
        args += ["--seeds", "0"]
    elif case == "bad_rule":
        args += ["--select", "best-test"]
    elif case == "bad_val_limit":
        args += ["--val-limit", "0"]
    res = invoke(args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], res.output
    assert not (out / "select").exists()


def test_seed_spread_of_a_real_eval_against_the_row_tables(tiny, tmp_path):
    """--seeds 0,1,5 on the scripted sampler: the summary's spread equals the one computed from each seed's rows."""
    model, tok, spec = tiny
    cfg = ev.EvalConfig(model=spec.path, problems=[str(DEMO_PROBLEMS)], protocol="quick", n=2, seeds="0,1,5")
    path = ev.run(cfg, tmp_path, loaded=tiny, backend=ScriptedBackend(tok, demo_golds(), p_correct=0.5))
    per = [pl.read_parquet(tmp_path / "eval" / f"seed_{s}" / "problems.parquet") for s in (0, 1, 5)]
    accs = [float(r["correct"].mean()) for r in per]  # n equal for every problem: avg@n = share of correct rows
    assert len(set(accs)) > 1  # the seeds sampled differently
    mean = sum(accs) / 3
    std = (sum((a - mean) ** 2 for a in accs) / 2) ** 0.5
    r = pl.read_parquet(path).row(0, named=True)
    assert r["seeds"] == 3 and r["samples"] == 3 * 40 * 2
    assert r["avg_at_n"] == pytest.approx(mean) and r["seed_std"] == pytest.approx(std)
    assert (r["seed_min"], r["seed_max"]) == (pytest.approx(min(accs)), pytest.approx(max(accs)))
    m = json.loads((tmp_path / "eval" / "summary.manifest.json").read_text())
    assert m["config"]["seeds"] == [0, 1, 5]
