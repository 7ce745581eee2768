"""Issue 15: nothing lost, nothing silently wrong.

Run-directory lock, stale temp files, failing writes, non-finite inputs, a diverging step, train --force
keeping the previous checkpoint, corrupt model files, bad devices, empty banks, loop pruning on rerun.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from stages.engine.atomic import write_parquet
from stages.engine.errors import InputError, WriteError
from stages.engine.locks import clean_stale_temp, lock_run_dir
from stages.engine.manifest import StageRun
from stages.engine.tableio import check_finite

REPO = Path(__file__).resolve().parents[1]


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---- lock -------------------------------------------------------------------------------------------------


def test_second_process_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from stages.engine.locks import lock_run_dir; lock_run_dir(sys.argv[1], 'sgsd loop demo');"
            "print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(InputError) as e:
            lock_run_dir(run, "second")
        msg = e.value.line()
        assert f"pid {proc.pid}" in msg and "sgsd loop demo" in msg and "since" in msg, msg
        with pytest.raises(InputError):  # a stage inside it is refused the same way
            StageRun(run, "demo", {"x": 1})
    finally:
        proc.kill()
        proc.wait()
    release = lock_run_dir(run, "after")  # the kernel dropped the killed holder's lock
    release()
    assert (run / ".sgsd.lock").read_bytes() == b""  # idle lock file: empty, byte-identical between runs


def test_lock_is_reentrant_and_covers_sub_folders(tmp_path):
    r1 = lock_run_dir(tmp_path / "run", "loop")
    r2 = lock_run_dir(tmp_path / "run" / "step_0001", "stage")  # the loop's own stage: no second lock file
    assert not (tmp_path / "run" / "step_0001" / ".sgsd.lock").exists()
    r2()
    r1()


def _hold(run_dir: Path, extra: str = "pass"):
    """A second process that holds ``run_dir``'s lock (and runs ``extra`` after taking it) until killed."""
    code = ("import sys, time; from pathlib import Path; from stages.engine.locks import lock_run_dir;"
            f"lock_run_dir(sys.argv[1], 'sgsd train demo'); {extra}; print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_nested_run_dirs_exclude_each_other_across_processes(tmp_path):
    """Issue 21: `train --run-dir R/step_0001` and `rollout --run-dir R` in two processes: whichever comes second
    is refused, naming the holder, and the first one's live temp folder is not cleaned away."""
    from stages.engine.locks import run_dir_in_use

    run = tmp_path / "R"
    (run / "step_0001").mkdir(parents=True)
    lock_run_dir(run, "earlier run")()  # R has a lock file of an earlier run (idle)
    partial = run / "step_0001" / "checkpoints" / ".step_000001.partial"
    proc = _hold(run / "step_0001", f"Path({str(partial)!r}).mkdir(parents=True)")
    try:
        with pytest.raises(InputError, match=rf"holds .*step_0001, which is in use by pid {proc.pid}"):
            lock_run_dir(run, "rollout")
        assert partial.is_dir()  # not cleaned: its writer is alive
        assert "in use by" in run_dir_in_use(run).line()
        with pytest.raises(InputError, match=rf"in use by pid {proc.pid}"):
            lock_run_dir(run / "step_0001", "second train")
        release = lock_run_dir(run / "step_0002", "a sibling")  # a sibling folder is free
        release()
    finally:
        proc.kill()
        proc.wait()
    assert run_dir_in_use(run) is None
    proc = _hold(run)
    try:
        with pytest.raises(InputError, match=rf"inside {run}, which is in use by pid {proc.pid}"):
            lock_run_dir(run / "step_0001" / "eval", "eval")
        assert run_dir_in_use(run / "step_0001") is not None
    finally:
        proc.kill()
        proc.wait()


def test_cli_refuses_a_busy_run_dir_before_the_stage_imports(tmp_path):
    run = tmp_path / "R"
    proc = _hold(run / "step_0001")
    try:
        code = ("import sys; from sgsd_cli import main;\n"
                "try:\n    main.main()\nexcept SystemExit as e:\n"
                "    print('exit', e.code, 'torch imported' if 'torch' in sys.modules else 'no torch', flush=True)")
        r = subprocess.run([sys.executable, "-c", code, "rollout", "--run-dir", str(run), "--model", "x",
                            "--problems", "y"], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert "exit 2 no torch" in r.stdout, (r.stdout, r.stderr)
        errs = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(errs) == 1 and errs[0].startswith("error: ") and f"pid {proc.pid}" in errs[0], r.stderr
    finally:
        proc.kill()
        proc.wait()


def test_update_skills_takes_the_run_dir_lock(tmp_path):
    from stages import update_skills

    run = tmp_path / "R"
    proc = _hold(run)
    try:
        with pytest.raises(InputError, match=rf"in use by pid {proc.pid}"):
            update_skills.run(update_skills.UpdateSkillsConfig(), run, bank=REPO / "data" / "demo" / "skill_bank.json")
        assert not (run / "bank").exists()
    finally:
        proc.kill()
        proc.wait()


def test_written_files_honour_the_umask(tmp_path, tiny):
    from stages.engine.atomic import atomic_write_text
    from stages.engine.models import save_model

    old = os.umask(0o002)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
        assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o664
        model, tok, _ = tiny
        save_model(model, tok, tmp_path / "model")
        assert (tmp_path / "model").stat().st_mode & 0o777 == 0o775
        # every file, model.safetensors too (transformers 5 stages it through a 0600 temp file)
        modes = {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "model").iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {0o664}, modes
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_cleanup_after_a_kill_says_what_it_removed(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "step_0001").mkdir(parents=True)
    (run / ".rollout.parquet.ab12cd34.tmp").write_bytes(b"half")
    (run / "step_0001" / ".checkpoint.partial").mkdir()
    lock_run_dir(run, "test")()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "removed 2 temp file(s)" in err[0] and ".rollout.parquet.ab12cd34.tmp" in err[0], err
    lock_run_dir(run, "again")()
    assert capsys.readouterr().err == ""  # nothing left: nothing said


# ---- stale temp files and writability ------------------------------------------------------------------


def test_stale_temp_files_are_cleared_and_a_half_swapped_folder_restored(tmp_path):
    run = tmp_path / "run"
    (run / "step_0001" / ".checkpoint.partial").mkdir(parents=True)
    (run / "step_0001" / ".checkpoint.partial" / "x.bin").write_bytes(b"1")
    (run / ".rollout.parquet.ab12cd34.tmp").write_bytes(b"half")
    (run / "step_0001" / ".train.parquet.new").write_bytes(b"staged")
    (run / "step_0002" / ".checkpoint.old").mkdir(parents=True)  # killed between the two renames of a swap
    (run / "step_0002" / ".checkpoint.old" / "w").write_bytes(b"old")
    (run / "keep.parquet").write_bytes(b"k")
    (run / ".hidden_user_file").write_bytes(b"h")
    release = lock_run_dir(run, "test")  # first acquisition cleans
    release()
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == [".hidden_user_file", ".sgsd.lock", "keep.parquet", "step_0001", "step_0002",
                    "step_0002/checkpoint", "step_0002/checkpoint/w"], left
    assert clean_stale_temp(run) == []


def test_run_dir_that_is_a_file_is_refused_before_work(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        StageRun(f, "demo", {})
    assert f.read_text() == "x"


def test_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    p = tmp_path / "t.parquet"
    write_parquet(pl.DataFrame({"a": [1]}), p)
    before = p.read_bytes()
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteError) as e:
        write_parquet(pl.DataFrame({"a": [2]}), p)
    monkeypatch.setattr(os, "fsync", real)
    assert str(p) in e.value.line() and "No space left" in e.value.line()
    assert p.read_bytes() == before
    assert [x.name for x in tmp_path.iterdir()] == ["t.parquet"]


def test_checkpoint_write_failure_keeps_previous(tmp_path):
    from stages.engine import checkpoint as ckpt

    def fill_ok(d: Path):
        (d / ckpt.STATE).write_text("{}")
        (d / ckpt.META).write_text("{}")

    def fill_full(d: Path):
        (d / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(d / "model.safetensors"))

    path = tmp_path / "checkpoint"
    ckpt.write(path, fill_ok)
    before = _snapshot(tmp_path)
    with pytest.raises(InputError, match="No space left"):
        ckpt.write(path, fill_full)
    assert _snapshot(tmp_path) == before  # old checkpoint intact, no .checkpoint.partial left


# ---- non-finite values ----------------------------------------------------------------------------------


def test_check_finite_by_hand():
    df = pl.DataFrame({"id": ["a", "b", "c"], "w": [1.0, 2.0, float("inf")],
                       "lp": [[-1.0], [-2.0, float("nan")], [-0.5]], "n": [1, 2, 3]})
    with pytest.raises(InputError, match=r"column 'w'.*1 row\(s\).*id 'c'"):
        check_finite(df, ["w"], "x.parquet", "id")
    with pytest.raises(InputError, match=r"column 'lp'.*id 'b'"):
        check_finite(df, ["lp"], "x.parquet", "id")
    check_finite(df, ["n", "missing"], "x.parquet", "id")  # ints and absent columns pass
    nul = pl.DataFrame({"lp": [None, [-1.0]]}, schema={"lp": pl.List(pl.Float64)})
    check_finite(nul, ["lp"], "x", nulls_ok=True)
    with pytest.raises(InputError, match="row 0"):
        check_finite(nul, ["lp"], "x")


def _poison(path: Path, col: str, value, row: int = 0):
    df = pl.read_parquet(path)
    vals = df[col].to_list()
    vals[row] = value
    write_parquet(df.with_columns(pl.Series(col, vals, dtype=df.schema[col])), path)


@pytest.mark.parametrize("table,col,value", [
    ("polarize.parquet", "weight", float("nan")),
    ("polarize.parquet", "support", float("inf")),
    ("score_teachers.parquet", "teacher_logprobs", None),  # set per row below: a NaN inside the list
])
def test_train_refuses_non_finite_inputs_and_keeps_previous_outputs(tmp_path, tiny, tiny_model_dir, table, col, value):
    from test_train import make_run, train_cfg

    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    cfg = train_cfg(tiny_model_dir, objective="sgsd", teacher_mode="fixed", steps=1)
    train.run(cfg, run)
    if value is None:
        lp = pl.read_parquet(run / table)[col][0].to_list()
        lp[1] = float("nan")
        value = lp
    _poison(run / table, col, value)
    before = _snapshot(run)
    with pytest.raises(InputError, match=f"{table}.*column '{col}'.*non-finite"):
        train.run(cfg, run, force=True)
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k != ".sgsd.lock"} == {k: v for k, v in before.items() if k != ".sgsd.lock"}


def test_grpo_nan_sample_logprobs_refused(tmp_path, tiny, tiny_model_dir):
    from test_train import make_run, train_cfg

    from stages import train

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=1, T=5)
    lp = pl.read_parquet(run / "rollout.parquet")["sample_logprobs"][0].to_list()
    lp[0] = float("-inf")
    _poison(run / "rollout.parquet", "sample_logprobs", lp)
    with pytest.raises(InputError, match="rollout.parquet.*sample_logprobs.*non-finite"):
        train.run(train_cfg(tiny_model_dir, objective="grpo", steps=1), run)


def test_diverging_step_stops_before_saving(tmp_path, tiny, tiny_model_dir, monkeypatch):
    """A step whose loss is NaN: TrainingDiverged naming the step; the previous checkpoint and table stay."""
    from test_train import make_run, train_cfg

    from stages import train
    from stages.engine.objectives import sgsd

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    cfg = train_cfg(tiny_model_dir, objective="sgsd", teacher_mode="fixed", steps=2)
    train.run(cfg, run)
    before = _snapshot(run)
    real = sgsd.rollout_loss

    def nan_on_second_step(*a, **k):
        out = real(*a, **k)
        return out * float("nan") if nan_on_second_step.calls >= 2 else out

    nan_on_second_step.calls = 0

    real_step = train.Trainer.train_step

    def counting_step(self, *a, **k):
        nan_on_second_step.calls += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(sgsd, "rollout_loss", nan_on_second_step)
    monkeypatch.setattr(train.Trainer, "train_step", counting_step)
    with pytest.raises(train.TrainingDiverged, match=r"optimizer step 2 .*not finite.*nothing saved"):
        train.run(cfg, run, force=True)
    after = _snapshot(run)
    assert {k: v for k, v in after.items() if k != ".sgsd.lock"} == {k: v for k, v in before.items() if k != ".sgsd.lock"}


def test_force_with_out_of_vocab_ids_keeps_the_previous_checkpoint(tmp_path, tiny, tiny_model_dir):
    from test_train import make_run, train_cfg

    from stages import train
    from stages.engine import checkpoint as ckpt

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    cfg = train_cfg(tiny_model_dir, objective="sgsd", teacher_mode="fixed", steps=1)
    train.run(cfg, run)
    ids = pl.read_parquet(run / "rollout.parquet")["completion_ids"][0].to_list()
    ids[0] = 10 ** 6
    _poison(run / "rollout.parquet", "completion_ids", ids)
    before = {k: v for k, v in _snapshot(run).items() if k != ".sgsd.lock"}
    with pytest.raises(InputError, match=r"rollout.parquet.*token id 1000000, outside the model's vocabulary"):
        train.run(cfg, run, force=True)
    assert {k: v for k, v in _snapshot(run).items() if k != ".sgsd.lock"} == before
    ckpt.validate(run / ckpt.FINAL)


def test_force_swaps_in_the_new_checkpoint_only_when_complete(tmp_path, tiny, tiny_model_dir):
    from test_train import make_run, train_cfg

    from stages import train
    from stages.engine import checkpoint as ckpt

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    train.run(train_cfg(tiny_model_dir, objective="sgsd", teacher_mode="fixed", steps=2, save_every=1), run)
    assert (run / "checkpoints" / "step_000001").is_dir()
    old_sums = (run / ckpt.FINAL / ckpt.CHECKSUMS).read_bytes()
    train.run(train_cfg(tiny_model_dir, objective="sgsd", teacher_mode="fixed", steps=1, lr=2e-3), run, force=True)
    assert (run / ckpt.FINAL / ckpt.CHECKSUMS).read_bytes() != old_sums
    ckpt.validate(run / ckpt.FINAL)
    man = json.loads((run / "train.manifest.json").read_text())
    assert man["complete"] and man["steps"] == 1 and pl.read_parquet(run / "train.parquet").height == 1
    assert not (run / "checkpoints" / "step_000001").exists()  # the old run's snapshot went after the swap
    assert not [p for p in run.rglob(".*") if p.name != ".sgsd.lock"]


# ---- models, devices ------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_one_line(tmp_path, tiny_model_dir, damage):
    import shutil

    from stages.engine.models import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}[damage])
    with pytest.raises(InputError) as e:
        load_model(str(d), device="cpu")
    assert str(f) in e.value.line() and "cannot load model" in e.value.line()


@pytest.mark.parametrize("device", ["tpu", "cuda:99", "banana"])
def test_unknown_or_absent_device_is_one_line(device):
    import torch

    from stages.engine.models import pick_device

    if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 99:
        pytest.skip("has 100 GPUs")
    with pytest.raises(InputError, match=device.split(":")[0]):
        pick_device(device)


def test_check_token_ids_by_hand():
    from stages.engine.models import check_token_ids

    check_token_ids([("a", "ids", [0, 9]), ("b", "ids", [])], 10, "t.parquet")
    with pytest.raises(InputError, match=r"t.parquet: rollout 'b': ids holds token id -1"):
        check_token_ids([("a", "ids", [1]), ("b", "ids", [3, -1])], 10, "t.parquet")
    with pytest.raises(InputError, match=r"token id 10, outside the model's vocabulary \[0, 10\)"):
        check_token_ids([("a", "ids", [10])], 10, "t.parquet")


# ---- stages: polarize NaN, empty banks --------------------------------------------------------------------


def test_polarize_refuses_nan_logprobs(tmp_path, tiny, tiny_model_dir):
    from test_train import make_run

    from stages import polarize

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    lp = pl.read_parquet(run / "score_teachers.parquet")["teacher_logprobs"][0].to_list()
    lp[2] = float("nan")
    _poison(run / "score_teachers.parquet", "teacher_logprobs", lp)
    before = _snapshot(run)
    with pytest.raises(InputError, match=r"score_teachers.parquet.*teacher_logprobs.*non-finite"):
        polarize.run(polarize.PolarizeConfig(model=str(tiny_model_dir)), run)
    assert {k: v for k, v in _snapshot(run).items() if k != ".sgsd.lock"} == \
        {k: v for k, v in before.items() if k != ".sgsd.lock"}


@pytest.mark.parametrize("skills,mistakes", [(0, 0), (1, 0), (0, 2)])
def test_banks_that_cannot_form_a_teacher_are_refused(tmp_path, skills, mistakes):
    from stages import build_index

    bank = {"general_skills": [{"skill_id": f"s{i}", "title": "t", "principle": "p", "when_to_apply": "w"}
                               for i in range(skills)],
            "common_mistakes": [{"mistake_id": f"m{i}", "description": "d", "why_it_happens": "w",
                                 "how_to_avoid": "h"} for i in range(mistakes)]}
    p = tmp_path / "bank.json"
    p.write_text(json.dumps(bank))
    with pytest.raises(InputError, match=f"{skills} general skills and {mistakes} common mistakes"):
        build_index.run(build_index.BuildIndexConfig(bank=str(p), mode="lexical"), tmp_path / "run")
    assert not (tmp_path / "run" / "index.parquet").exists()


# ---- loop pruning on a rerun ------------------------------------------------------------------------------


def test_prune_steps_finishes_on_rerun(tmp_path):
    from stages.loop import prune_steps, step_dir

    for n in range(1, 5):
        (step_dir(tmp_path, n) / "checkpoint").mkdir(parents=True)
        (step_dir(tmp_path, n) / "checkpoints" / "step_000001").mkdir(parents=True)
        (step_dir(tmp_path, n) / "train.parquet").write_bytes(b"t")
    prune_steps(tmp_path, 4, 2)
    prune_steps(tmp_path, 4, 2)  # idempotent
    have = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("checkpoint*") if p.parent.name.startswith("step_0"))
    assert have == ["step_0003/checkpoint", "step_0003/checkpoints", "step_0004/checkpoint", "step_0004/checkpoints"]
    assert all((step_dir(tmp_path, n) / "train.parquet").exists() for n in range(1, 5))
    prune_steps(tmp_path, 4, 0)  # 0 keeps all


# ---- score-teachers: unusable rollout tables (issue 21) ---------------------------------------------------


def _score(run: Path, model_dir: Path):
    from stages import score_teachers

    cfg = score_teachers.ScoreTeachersConfig(model=str(model_dir), bank=str(REPO / "data" / "demo" / "skill_bank.json"),
                                             k=2, retrieval="lexical", device="cpu", dtype="fp32")
    return score_teachers.run(cfg, run, force=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_score_teachers_refuses_non_finite_sample_logprobs(tmp_path, tiny, tiny_model_dir, value):
    from test_train import make_run

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    lp = pl.read_parquet(run / "rollout.parquet")["sample_logprobs"][1].to_list()
    lp[0] = value
    _poison(run / "rollout.parquet", "sample_logprobs", lp, row=1)
    before = _snapshot(run)
    with pytest.raises(InputError, match=r"rollout.parquet: column 'sample_logprobs' holds a non-finite value"):
        _score(run, tiny_model_dir)
    assert {k: v for k, v in _snapshot(run).items() if k != ".sgsd.lock"} == \
        {k: v for k, v in before.items() if k != ".sgsd.lock"}


def test_score_teachers_on_all_empty_completions_is_one_line(tmp_path, tiny, tiny_model_dir):
    from test_train import make_run

    run = make_run(tmp_path / "run", tiny, n_problems=2, K=2, T=5)
    df = pl.read_parquet(run / "rollout.parquet")
    empty = [[] for _ in range(df.height)]
    write_parquet(df.with_columns(pl.Series("completion_ids", empty, dtype=df.schema["completion_ids"]),
                                  pl.Series("sample_logprobs", empty, dtype=df.schema["sample_logprobs"])),
                  run / "rollout.parquet")
    before = _snapshot(run)
    with pytest.raises(InputError, match=r"rollout.parquet: every completion is empty"):
        _score(run, tiny_model_dir)
    assert {k: v for k, v in _snapshot(run).items() if k != ".sgsd.lock"} == \
        {k: v for k, v in before.items() if k != ".sgsd.lock"}
