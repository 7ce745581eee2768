"""2-process training on CPU (gloo, torchrun) equals one process over the same global batch.

One torchrun launch runs the same SGSD training twice, under DDP and under FSDP2 (``fully_shard``, which
runs on CPU with gloo in this torch), each rank taking disjoint rows of every global batch; the test
compares losses and grad norms (1e-5) and the final weights (1e-4, AdamW) with a single-process run; a third run continues
under FSDP from the FSDP checkpoint (optimizer state loaded into the sharded optimizer).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from test_train import make_run, train_cfg

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from stages import train

    spec = json.loads(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for mode, run_dir, over in spec["runs"]:
        cfg = train.TrainConfig(**{**spec["cfg"], **over, "distributed": mode})
        train.run(cfg, run_dir)
    dist.destroy_process_group()
""")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_two_process_gloo_ddp_and_fsdp_equal_one_process(tmp_path, tiny, tiny_model_dir):
    base = make_run(tmp_path / "single", tiny, n_problems=4, K=2, T=6)
    for name in ("ddp", "fsdp", "single_cont", "fsdp_cont"):
        shutil.copytree(base, tmp_path / name)
    kw = dict(objective="sgsd", steps=2, batch_size=4, micro_batch_size=1, lr=1e-3, max_grad_norm=1.0)
    from stages import train

    train.run(train_cfg(tiny_model_dir, **kw), base)  # one process: grad accumulation 4
    # continuing from a checkpoint (optimizer state included), one more step
    cont = {"model": str(base / "checkpoint"), "steps": 1}
    train.run(train_cfg(tiny_model_dir, **{**kw, **cont}), tmp_path / "single_cont")

    cfg = {k: v for k, v in train_cfg(tiny_model_dir, **kw).__dict__.items()}
    spec = {"cfg": cfg, "runs": [["ddp", str(tmp_path / "ddp"), {}], ["fsdp", str(tmp_path / "fsdp"), {}],
                                 ["fsdp", str(tmp_path / "fsdp_cont"),
                                  {"model": str(tmp_path / "fsdp" / "checkpoint"), "steps": 1}]]}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    one = pl.read_parquet(base / "train.parquet")
    w1 = _weights(base / "checkpoint")
    for name in ("ddp", "fsdp"):
        two = pl.read_parquet(tmp_path / name / "train.parquet")
        man = json.loads((tmp_path / name / "train.manifest.json").read_text())
        assert man["world_size"] == 2 and man["distributed"] == name and man["grad_accum"] == 2
        assert two["loss"].to_list() == pytest.approx(one["loss"].to_list(), abs=1e-5)
        assert two["grad_norm"].to_list() == pytest.approx(one["grad_norm"].to_list(), abs=1e-5)
        assert two["rollouts"].to_list() == [4, 4]
        w2 = _weights(tmp_path / name / "checkpoint")
        assert w1.keys() == w2.keys()
        worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        # AdamW divides by sqrt(v) + eps: an element whose gradient is float noise (|g| ~ eps) moves by up to
        # ~lr |g| / (|g| + eps) differently (1.4e-5 seen at lr 1e-3), hence 1e-4 on weights, 1e-5 on losses
        assert worst < 1e-4, (name, worst)
        # the weights moved 10x that: the comparison is not vacuous
        assert max(float((w1[k] - _weights(tiny_model_dir)[k]).abs().max()) for k in w1) > 1e-3
    # FSDP checkpoints (full optimizer state gathered on rank 0) load back under FSDP: same next step
    a, b = _weights(tmp_path / "single_cont" / "checkpoint"), _weights(tmp_path / "fsdp_cont" / "checkpoint")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert json.loads((tmp_path / "fsdp_cont" / "checkpoint" / "sgsd_checkpoint.json").read_text())["policy_step"] == 3


def test_group_timeout_from_the_environment(monkeypatch):
    from datetime import timedelta

    from stages.engine.distributed import group_timeout
    from stages.engine.errors import InputError

    monkeypatch.delenv("SGSD_DIST_TIMEOUT_S", raising=False)
    assert group_timeout() == timedelta(hours=2)
    monkeypatch.setenv("SGSD_DIST_TIMEOUT_S", "90")
    assert group_timeout() == timedelta(seconds=90)
    for bad in ("abc", "0", "-5", "inf", "nan"):
        monkeypatch.setenv("SGSD_DIST_TIMEOUT_S", bad)
        with pytest.raises(InputError, match="SGSD_DIST_TIMEOUT_S"):
            group_timeout()
