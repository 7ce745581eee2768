"""`torchrun --nproc_per_node 2 sgsd loop` on CPU (gloo) against one process over the same global batch.

Sampling is seeded per problem, so the two ranks' rollout parts (``rollout/part-0000i-of-00002``) read in order
are the one-process table token for token; scoring, polarity and training follow within float tolerance (the
2-rank gradient is an all-reduce of two halves; 1e-5), under DDP and under FSDP2.  A last run has rank 1 killed
with SIGKILL in the middle of step 2 (after its rollout and scoring parts are written, inside training); the
restart skips what is complete and ends with the same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from test_loop import _cfg as loop_cfg
from stages.engine.tableio import read_table, stage_table_path

ROOT = Path(__file__).resolve().parent.parent

# rank 1 dies (SIGKILL, no cleanup) when it enters training in step 2: its rollout and score parts are on disk
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from stages import train
    orig = train.Trainer.fit
    def fit(self, run_dir, **kw):
        if os.environ.get("RANK") == "1" and Path(run_dir).name == "step_0002":
            os.kill(os.getpid(), signal.SIGKILL)
        return orig(self, run_dir, **kw)
    train.Trainer.fit = fit
    from sgsd_cli.main import main
    main()
""")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(tmp_path: Path, name: str, model: Path, mode: str = "ddp", objective: str = "sgsd", n: int = 1):
    """tests/test_loop.py's recipe (2 steps) with 4 prompts per step, the plain hf engine and every checkpoint kept:
    (config file, --set overrides)."""
    # adam_eps 1e-6: AdamW's g / (sqrt(v) + eps) would otherwise blow float noise in near-zero gradients up to
    # ~1e-5 of weight per step (seen at eps 1e-8); real gradients here are >= 1e-4, so the training is unchanged
    sets = ["loop.prompts_per_step=4", 'loop.backend="hf"', "loop.keep_last=0", f'train.distributed="{mode}"',
            "train.adam_eps=1e-6"]
    return loop_cfg(tmp_path, model, objective=objective, steps=2, n=n, name=name), sets


def _run_here(cfg) -> None:
    from stages import loop
    from stages.engine.config import resolve

    sections, source = resolve(cfg[0], cfg[1])
    loop.run(sections, source=source)


def _torchrun(script: list[str], cfg, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    sets = [a for v in cfg[1] for a in ("--set", v)]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_port()), *script, "loop", "--config", str(cfg[0]), *sets],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _sgsd_script(tmp_path: Path) -> list[str]:
    """The installed command as the multi-GPU recipes start it (``torchrun ... --no-python sgsd loop``), else
    the same entry point as a script."""
    if shutil.which("sgsd"):
        return ["--no-python", "sgsd"]  # as scripts/recipe_*gpu.sh run it
    s = tmp_path / "sgsd_entry.py"
    s.write_text("from sgsd_cli.main import main\nmain()\n")
    return [str(s)]


def _table(sd: Path, name: str) -> pl.DataFrame:
    return read_table(stage_table_path(sd, name))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "step_0002" / "checkpoint" / "model.safetensors"))


def _same_run(one: Path, two: Path) -> None:
    for n in (1, 2):
        a, b = one / f"step_{n:04d}", two / f"step_{n:04d}"
        ra, rb = pl.read_parquet(a / "rollout.parquet"), _table(b, "rollout")
        assert rb["rollout_id"].to_list() == ra["rollout_id"].to_list()
        assert rb["completion_ids"].to_list() == ra["completion_ids"].to_list(), f"step {n}: rollouts differ"
        sa, sb = pl.read_parquet(a / "score_teachers.parquet"), _table(b, "score_teachers")
        assert sb.select("rollout_id", "teacher_rank").rows() == sa.select("rollout_id", "teacher_rank").rows()
        for x, y in zip(sa["teacher_logprobs"].to_list(), sb["teacher_logprobs"].to_list()):
            assert y == pytest.approx(x, abs=1e-5)  # 2e-6 seen at step 2
        pa, pb = pl.read_parquet(a / "polarize.parquet"), pl.read_parquet(b / "polarize.parquet")
        assert pb["category"].to_list() == pa["category"].to_list()
        assert pb["weight"].to_list() == pytest.approx(pa["weight"].to_list(), abs=1e-6)
        ta, tb = pl.read_parquet(a / "train.parquet"), pl.read_parquet(b / "train.parquet")
        assert tb["loss"].to_list() == pytest.approx(ta["loss"].to_list(), abs=1e-5)
        assert tb["grad_norm"].to_list() == pytest.approx(ta["grad_norm"].to_list(), rel=1e-5, abs=1e-5)
    w1, w2 = _weights(one), _weights(two)
    assert set(w1) == set(w2)
    for k in w1:  # 7e-7 seen; the weights move by 2e-3
        assert torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0), k
    ma, mb = pl.read_parquet(one / "metrics.parquet"), pl.read_parquet(two / "metrics.parquet")
    assert mb["loss"].to_list() == pytest.approx(ma["loss"].to_list(), abs=1e-5)
    assert mb["rollouts"].to_list() == ma["rollouts"].to_list() == [4, 4]


@pytest.mark.slow
def test_two_rank_loop_equals_one_process_and_resumes_after_a_rank_is_killed(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    _run_here(_cfg(tmp_path, "one", tiny_model_dir))
    one = tmp_path / "one"
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    w1 = _weights(one)
    assert max(float((w1[k] - init[k]).abs().max()) for k in w1 if k in init) > 1e-3  # training moved the weights (100x the tolerance)

    two = tmp_path / "two"
    proc = _torchrun(_sgsd_script(tmp_path), _cfg(tmp_path, "two", tiny_model_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # every rank wrote its part of the sharded stages; rank 0 wrote the step's polarize, train and metrics
    for n in (1, 2):
        sd = two / f"step_{n:04d}"
        for stage in ("rollout", "score_teachers"):
            parts = sorted(p.name for p in (sd / stage).glob("*.parquet"))
            assert parts == ["part-00000-of-00002.parquet", "part-00001-of-00002.parquet"], (stage, parts)
            assert not (sd / f"{stage}.parquet").exists()
        man = json.loads((sd / "train.manifest.json").read_text())
        assert man["world_size"] == 2 and man["distributed"] == "ddp" and man["global_batch"] == 4
    assert [pl.read_parquet(two / "step_0001" / "rollout" / f"part-0000{i}-of-00002.parquet").height
            for i in (0, 1)] == [2, 2]
    _same_run(one, two)

    # FSDP2: the policy sharded over the ranks; each rank generates and scores with one full inference copy,
    # refreshed from the shards one tensor at a time after every step
    proc = _torchrun(_sgsd_script(tmp_path), _cfg(tmp_path, "fsdp", tiny_model_dir, mode="fsdp"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert json.loads((tmp_path / "fsdp" / "step_0002" / "train.manifest.json").read_text())["distributed"] == "fsdp"
    _same_run(one, tmp_path / "fsdp")

    # kill -9 of rank 1 inside step 2's training; torchrun ends rank 0; the plain restart resumes
    cfg = _cfg(tmp_path, "killed", tiny_model_dir)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    proc = _torchrun([str(killer)], cfg)
    killed = tmp_path / "killed"
    assert proc.returncode != 0
    assert (killed / "step_0001" / "train.manifest.json").exists()
    assert not (killed / "step_0002" / "train.manifest.json").exists()
    part = killed / "step_0002" / "rollout" / "part-00001-of-00002.parquet"
    assert part.exists()
    before = part.stat().st_mtime_ns
    proc = _torchrun(_sgsd_script(tmp_path), cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert part.stat().st_mtime_ns == before  # the finished rollout part was kept, not redone
    _same_run(one, killed)


@pytest.mark.slow
def test_two_rank_grpo_loop_equals_one_process(tmp_path, tiny_model_dir):
    """GRPO, 2 samples per prompt: a rank keeps every sample of its problems (the group stays whole) and rank 0
    grades; same rollouts, grades and losses as one process.  (The random model answers nothing right, so every
    advantage is 0 and the weights do not move: the weight comparison lives in the SGSD test above.)"""
    torch.set_num_threads(1)
    _run_here(_cfg(tmp_path, "one", tiny_model_dir, objective="grpo", n=2))
    proc = _torchrun(_sgsd_script(tmp_path), _cfg(tmp_path, "two", tiny_model_dir, objective="grpo", n=2))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    one, two = tmp_path / "one", tmp_path / "two"
    for n in (1, 2):
        a, b = pl.read_parquet(one / f"step_{n:04d}" / "rollout.parquet"), _table(two / f"step_{n:04d}", "rollout")
        assert b["rollout_id"].to_list() == a["rollout_id"].to_list() and b.height == 8
        assert b["completion_ids"].to_list() == a["completion_ids"].to_list(), f"step {n}: rollouts differ"
        parts = [pl.read_parquet(p)["problem_id"].unique().to_list()
                 for p in sorted((two / f"step_{n:04d}" / "rollout").glob("*.parquet"))]
        assert len(parts) == 2 and not set(parts[0]) & set(parts[1])  # no problem split across ranks
        ga = pl.read_parquet(one / f"step_{n:04d}" / "polarize_rollouts.parquet")
        gb = pl.read_parquet(two / f"step_{n:04d}" / "polarize_rollouts.parquet")
        assert gb["correct"].to_list() == ga["correct"].to_list()
        ta, tb = pl.read_parquet(one / f"step_{n:04d}" / "train.parquet"), pl.read_parquet(two / f"step_{n:04d}" / "train.parquet")
        assert tb["loss"].to_list() == pytest.approx(ta["loss"].to_list(), abs=1e-5)
